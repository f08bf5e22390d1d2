"""Inverse Leaky ReRoPE (Su 2023, kexue.fm/archives/9728, "Transformer upgrade path 13: using Leaky
ReRoPE in reverse"): TRAIN with Leaky ReRoPE whose slope 1/k exceeds 1 (0 < k < 1), so relative
distances past the window are stretched,

    r' = r                 for r < w,
    r' = w + (r - w) / k   for r >= w,

then INFER with plain RoPE. At inference a distance r is read as r, which training already
covered up to w + (T - 1 - w) / k: the model meets no unseen rotation until that length. k = 1 is
plain RoPE.

The installed attention follows ``module.training``: in training, a pre-hook hands each attention
module cos = 1, sin = 0 and the lab attention function scores each (query, key) pair densely with
q, k rotated to their real positions when near and to the stretched ones when far (float32
softmax, differentiable; the lab's short training contexts keep the L x L scores small); in eval mode both step aside and the model is plain RoPE (SDPA on
the model's own rotation), so the trained model after ``model.eval()``, a checkpoint loaded by
``load_lab`` and any rope_ext method applied at evaluation all see plain RoPE. The encoding adds no
weights (the checkpoint is a plain Llama one) and ``inference()`` is ("none", {}): plain RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rope_ext.rotary import cos_sin, rotate
from rope_ext.validate import MAX_COUNT, integer, number

from . import register
from .base import PREFIX, Encoding, allowed_keys, attach, attention_layers, register_attention, repeat_heads
from .hwfa import no_rotation, positions_of

ATTENTION = PREFIX + "inverse_leaky"
DEFAULT_K = 0.125  # training covers distances up to w + 8 (T - 1 - w): past 6x the trained length at w = T / 4
WINDOW_FRACTION = 4  # default window T / 4


def stretched_far_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) positions of the far part, w + (n - w) / k and m / k: their difference is the
    Leaky ReRoPE distance w + (r - w) / k (Su 2023), stretched when k < 1."""
    return window + (q_pos - window) / k, k_pos / k


class StretchedRoPE(torch.nn.Module):
    """One attention module's training-time map (no weights): RoPE's inverse frequencies (a
    non-persistent buffer), the window and k."""

    def __init__(self, inv_freq: torch.Tensor, window: int, k: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().clone(), persistent=False)
        self.window = window
        self.k = k


def inverse_leaky_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Training: two-part attention of unrotated q, k (RoPE at n - m inside the window, the
    stretched map past it). Eval mode: the model's SDPA on its own RoPE rotation."""
    if not module.training:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    role: StretchedRoPE = module.lab_pe
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    q_pos, k_pos = positions_of(query, key, kwargs)

    def rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(x, *cos_sin(role.inv_freq, positions, 1.0, x.dtype))

    heads = query.shape[1]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    fq, fk = stretched_far_positions(q_pos, k_pos, role.window, role.k)
    near = torch.matmul(rotated(query, q_pos).float(), rotated(key, k_pos).float().transpose(-1, -2))
    far = torch.matmul(rotated(query, fq).float(), rotated(key, fk).float().transpose(-1, -2))
    rel = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    logits = torch.where(rel < role.window, near, far) * scaling
    allowed = allowed_keys(attention_mask, q_pos.shape[0], q_pos.shape[1], k_pos.shape[1], query.device) & (rel >= 0)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


def training_no_rotation(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook: unrotated q, k in training (the attention rotates them); eval mode untouched."""
    return no_rotation(module, args, kwargs) if module.training else None


@register("inverse_leaky")
@dataclass(frozen=True, kw_only=True)
class InverseLeakyReRoPE(Encoding):
    """Train with stretched Leaky ReRoPE (0 < k <= 1), evaluate the checkpoint as plain RoPE."""

    paper: ClassVar[str] = "Su 2023, Transformer upgrade path 13: inverse use of Leaky ReRoPE, kexue.fm/archives/9728"
    rope_based: ClassVar[bool] = True
    window: int | None = None
    k: float = DEFAULT_K

    def __post_init__(self) -> None:
        if self.window is not None:
            integer(self.window, "inverse_leaky: window", minimum=1, maximum=MAX_COUNT)
        number(self.k, "inverse_leaky: k", above=0, at_most=1)

    def install(self, model: torch.nn.Module) -> None:
        trained = int(model.config.max_position_embeddings)
        window = trained // WINDOW_FRACTION if self.window is None else self.window
        if not 1 <= window < trained:
            raise ValueError(f"inverse_leaky: window={window} must be in [1, {trained - 1}] (below the trained length "
                             f"{trained}: no distance would be stretched)")
        inv_freq = model.model.rotary_emb.inv_freq
        attach(model, lambda _: StretchedRoPE(inv_freq, window, float(self.k)))
        for attn in attention_layers(model):
            attn.register_forward_pre_hook(training_no_rotation, with_kwargs=True)
        model.config._attn_implementation = register_attention(ATTENTION, inverse_leaky_attention)

    def inference(self) -> tuple[str, dict] | None:
        """A loaded checkpoint runs as plain RoPE (rope_ext's "none"; eval mode is already plain RoPE)."""
        return ("none", {})
