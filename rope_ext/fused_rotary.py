"""The fused rotary kernel inside the model's own rotation, for static frequency methods.

A static method leaves rotation to the model: its attention calls its modeling file's
``apply_rotary_pos_emb(q, k, cos, sin)``, several elementwise passes over q and k. With
``kernel="triton"`` the patch makes this model's rotary module mark the cos / sin tables it hands
out, and puts ``dispatching(original)`` in place of that function for the patch's lifetime: marked
tables go to ``rope_ext.rotary.apply_rotary`` (q and k in one launch), anything else -- every other
model in the process -- to the original function, unchanged.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn
from . import rotary

MARK = "_rope_ext_kernel"


def is_dispatching(fn: Callable) -> bool:
    return getattr(fn, MARK, None) is not None


def dispatching(original: Callable) -> Callable:
    """``apply_rotary_pos_emb`` that sends tables marked by ``marking_forward`` to the fused kernel."""

    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
        kernel = getattr(cos, MARK, None)
        fits = q.dim() == 4 and k.dim() == 4 and q.shape[2] == k.shape[2] and cos.dim() == 3
        if kernel is None or unsqueeze_dim != 1 or not fits:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return rotary.apply_rotary(q, k, cos, sin, kernel=kernel)

    setattr(apply_rotary_pos_emb, MARK, original)
    return apply_rotary_pos_emb


def marking_forward(forward: Callable, kernel: str) -> Callable:
    """The rotary module's forward, its (cos, sin) marked for the fused kernel."""

    def forward_marked(*args: Any, **kwargs: Any):
        cos, sin = forward(*args, **kwargs)
        setattr(cos, MARK, kernel)
        return cos, sin

    return forward_marked


def install(rec: Any, family: Any, model: nn.Module, kernel: str) -> None:
    """Mark the model's rotary tables and route its modeling files' rotation through ``dispatching``;
    every write goes through the patch's Recorder."""
    for module in family.rotary_modules(model):
        rec.setattr(module, "forward", marking_forward(module.forward, kernel))
    for name in sorted({type(m).__module__ for m in family.attention_modules(model)}):
        modeling = sys.modules[name]
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is not None and not is_dispatching(original):
            rec.setattr(modeling, "apply_rotary_pos_emb", dispatching(original))
