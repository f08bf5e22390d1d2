"""HWFA, Hybrid Window-Full Attention (Su 2023, kexue.fm/archives/9603, "Transformer upgrade path
9: a new idea of global length extrapolation").

Every layer below the top attends only to the last ``window`` positions (sliding-window causal
attention, RoPE as usual); the top layer attends to everything with NO position encoding and
log-n scaling of the query, q_n *= max(1, log(n + 1) / log(T)) (T the trained length; the
``logn=True`` option of rope_ext's methods). Windowed layers never see a distance past ``window`` and the top layer
has no distance to extrapolate, so the model runs past T without any method. ``window`` defaults to
T / 2; ``top_rope=True`` keeps RoPE in the top layer (the ablation: with window >= the length it is
the plain RoPE model). Attention is the model's SDPA with a windowed mask. Not rope-based: rope_ext
methods would re-rotate the position-free top layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rope_ext.methods import key_positions
from rope_ext.validate import MAX_COUNT, boolean, integer

from . import register
from .base import PREFIX, Encoding, allowed_keys, attach, attention_layers, register_attention

ATTENTION = PREFIX + "hwfa"


def logn_scale(positions: torch.Tensor, trained_length: int) -> torch.Tensor:
    """max(1, log(n + 1) / log(T)) for positions n (Su 2023; Chiang & Cholak 2022): 1 inside the
    trained length, growing past it so the attention's entropy stays about constant."""
    n = positions.to(torch.float32) + 1.0
    return torch.clamp(torch.log(n) / math.log(trained_length), min=1.0)


class HWFALayer(torch.nn.Module):
    """One layer's HWFA role (no weights): a sliding ``window`` (None: full attention) and the
    trained length of its log-n query scaling (None: none)."""

    def __init__(self, window: int | None, logn_length: int | None) -> None:
        super().__init__()
        self.window = window
        self.logn_length = logn_length


def positions_of(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos (B, Lq), k_pos (B, Lk)) of an attention call from its position_ids (by index without);
    cached keys are the contiguous run before the first query (transformers' plain KV cache)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    pos = kwargs.get("position_ids")
    if pos is None or pos.shape[-1] != q_len:
        pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[None, :]
    q_pos = pos.to(query.device).expand(query.shape[0], q_len)
    return q_pos, key_positions(q_pos, kv_len)


def window_allowed(mask: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Bool (B, 1, Lq, Lk): the model's mask (causal when None) restricted to n - m < window."""
    allowed = allowed_keys(mask, q_pos.shape[0], q_pos.shape[1], k_pos.shape[1], q_pos.device)
    return allowed & (q_pos[:, None, :, None] - k_pos[:, None, None, :] < window)


def hwfa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The model's SDPA under the layer's HWFA role (``lab_pe``): windowed, or full with log-n queries."""
    role: HWFALayer = module.lab_pe
    q_pos, k_pos = positions_of(query, key, kwargs)
    if role.logn_length is not None:
        query = query * logn_scale(q_pos, role.logn_length)[:, None, :, None].to(query.dtype)
    if role.window is not None and int(q_pos.max() - k_pos.min()) >= role.window:
        attention_mask = window_allowed(attention_mask, q_pos, k_pos, role.window)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def no_rotation(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of an attention module: cos = 1, sin = 0, so its q and k stay unrotated
    (q * 1 + rotate_half(q) * 0 = q exactly)."""
    cos, sin = kwargs["position_embeddings"]
    return args, {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}


@register("hwfa")
@dataclass(frozen=True, kw_only=True)
class HWFA(Encoding):
    """Sliding-window RoPE layers under one full, position-free, log-n-scaled top layer."""

    paper: ClassVar[str] = "Su 2023, Hybrid Window-Full Attention (HWFA), kexue.fm/archives/9603"
    rope_based: ClassVar[bool] = False
    window: int | None = None
    top_rope: bool = False

    def __post_init__(self) -> None:
        if self.window is not None:
            integer(self.window, "hwfa: window", minimum=1, maximum=MAX_COUNT)
        boolean(self.top_rope, "hwfa: top_rope")

    def install(self, model: torch.nn.Module) -> None:
        layers = attention_layers(model)
        if len(layers) < 2:
            raise ValueError(f"hwfa needs at least 2 layers (windowed layers under a full top layer), got {len(layers)}")
        trained = int(model.config.max_position_embeddings)
        window = trained // 2 if self.window is None else self.window
        top = len(layers) - 1
        attach(model, lambda i: HWFALayer(None, trained) if i == top else HWFALayer(window, None))
        if not self.top_rope:
            layers[top].register_forward_pre_hook(no_rotation, with_kwargs=True)
        model.config._attn_implementation = register_attention(ATTENTION, hwfa_attention)
