"""What the model's own rotation does with the tables of a patched model's rotary module.

A transformers attention module rotates q and k by calling its modeling file's
``apply_rotary_pos_emb(q, k, cos, sin)``: several elementwise passes over q and k. A patched model's
rotary module marks the cos / sin tables it hands out, and the patch puts ``dispatching(original)``
in place of that function for the patch's lifetime:
  * mark ``IDENTITY`` (methods that rotate in rope_ext's attention function, whose tables are
    cos = 1, sin = 0): q and k are returned as they are, skipping a rotation that changes nothing;
  * mark ``"triton"`` (static frequency methods with ``kernel="triton"``): q and k go to the fused
    kernel (``rope_ext.rotary.apply_rotary``), one launch for both;
  * no mark -- every other model in the process -- the original function, unchanged.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from . import rotary

MARK = "_rope_ext_kernel"
IDENTITY = "identity"


def is_dispatching(fn: Callable) -> bool:
    return getattr(fn, MARK, None) is not None


def dispatching(original: Callable) -> Callable:
    """``apply_rotary_pos_emb`` that serves tables marked by ``marking_forward`` (see the module doc)."""

    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
        mark = getattr(cos, MARK, None)
        if mark == IDENTITY:
            return q, k
        fits = q.dim() == 4 and k.dim() == 4 and q.shape[2] == k.shape[2] and cos.dim() == 3
        if mark is None or unsqueeze_dim != 1 or not fits:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return rotary.apply_rotary(q, k, cos, sin, kernel=mark)

    setattr(apply_rotary_pos_emb, MARK, original)
    return apply_rotary_pos_emb


def marking_forward(forward: Callable, mark: str) -> Callable:
    """The rotary module's forward, its (cos, sin) marked with ``mark``."""

    def forward_marked(*args: Any, **kwargs: Any):
        cos, sin = forward(*args, **kwargs)
        setattr(cos, MARK, mark)
        return cos, sin

    return forward_marked


def install(rec: Any, family: Any, model: nn.Module, mark: str) -> None:
    """Mark the model's rotary tables and route its modeling files' rotation through ``dispatching``;
    every write goes through the patch's Recorder."""
    for module in family.rotary_modules(model):
        rec.setattr(module, "forward", marking_forward(module.forward, mark))
    for name in sorted({type(m).__module__ for m in family.attention_modules(model)}):
        modeling = sys.modules[name]
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is not None and not is_dispatching(original):
            rec.setattr(modeling, "apply_rotary_pos_emb", dispatching(original))
