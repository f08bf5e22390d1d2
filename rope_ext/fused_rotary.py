"""What the model's own rotation does with the tables of a patched model's rotary module.

A transformers attention module rotates q and k by calling its modeling file's
``apply_rotary_pos_emb(q, k, cos, sin)``: several elementwise passes over q and k. A patched model's
rotary module marks the cos / sin tables it hands out, and ``dispatching(original)`` takes that
function's place while at least one patched model of the family needs it:
  * mark ``IDENTITY`` (methods that rotate in rope_ext's attention function, whose tables are
    cos = 1, sin = 0): q and k are returned as they are, skipping a rotation that changes nothing;
  * mark ``"triton"`` (static frequency methods with ``kernel="triton"``): q and k go to the fused
    kernel (``rope_ext.rotary.apply_rotary``), one launch for both;
  * no mark -- every other model in the process -- the original function, unchanged.
The swap is module-level, so it is shared: a count per modeling module says how many patched models
use it; the first (0 -> 1) installs it and the last to go (1 -> 0) puts the original back, through
the patch's Recorder (``on_undo``), so unpatching one model never removes another's fast path, and
a patch that fails midway gives its count back with the rest of its writes.
"""
from __future__ import annotations

import functools
import sys
from types import ModuleType
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


_USERS: dict[str, int] = {}  # modeling module name -> patched models using its dispatching apply_rotary_pos_emb


def users(modeling: ModuleType) -> int:
    """How many patched models use the dispatching ``apply_rotary_pos_emb`` of ``modeling``."""
    return _USERS.get(modeling.__name__, 0)


def _acquire(modeling: ModuleType) -> None:
    """One more user of the swap; installed whenever the module's function is not a dispatching one
    (the first user, or someone replaced it meanwhile)."""
    name = modeling.__name__
    current = modeling.apply_rotary_pos_emb
    if not is_dispatching(current):
        modeling.apply_rotary_pos_emb = dispatching(current)
    _USERS[name] = _USERS.get(name, 0) + 1


def _release(modeling: ModuleType) -> None:
    """One user fewer; the last one puts the original function back (unless someone else has
    replaced the dispatching one meanwhile: then theirs stays)."""
    name = modeling.__name__
    _USERS[name] -= 1
    if _USERS[name] == 0:
        del _USERS[name]
        current = modeling.apply_rotary_pos_emb
        if is_dispatching(current):
            modeling.apply_rotary_pos_emb = getattr(current, MARK)


def install(rec: Any, family: Any, model: nn.Module, mark: str) -> None:
    """Mark the model's rotary tables (``rec.setattr``) and count the model as a user of its modeling
    files' dispatching rotation (``rec.on_undo`` gives the count back at unpatch)."""
    for module in family.rotary_modules(model):
        rec.setattr(module, "forward", marking_forward(module.forward, mark))
    for name in sorted({type(m).__module__ for m in family.attention_modules(model)}):
        modeling = sys.modules[name]
        if getattr(modeling, "apply_rotary_pos_emb", None) is not None:
            _acquire(modeling)
            rec.on_undo(functools.partial(_release, modeling))
