"""FIRE (Li et al. 2023, "Functional Interpolation for Relative Positions Improves Long Context
Transformers", with its log transform and adaptive threshold, as in the paper's PyTorch
listing): no rotation; each layer adds a learned function of the normalised distance to the logits:

    b(i, j) = f_theta( psi(i - j) / psi(max(L, i)) ),   psi(x) = log(|c x| + 1)

f_theta: an MLP 1 -> width (ReLU) -> H (one bias per head); c (initialised to ``init_c``, used as
|c|) and the threshold L = |l * L_0| (L_0 = ``init_threshold``, l learned from 1) are learned; eps
keeps the denominator positive. The query's own position i normalises its distances ("progressive
interpolation"): every distance maps into [0, 1] at any length (training at T <= L sees [0,
psi(T) / psi(L)]). The listing's defaults: width 32, c 0.1, L_0 512, eps 1e-6.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from rope_ext.validate import MAX_COUNT, integer, number

from . import register
from .base import AttentionCall, Encoding, attach, remove_rotation, softmax_attention, use_attention


def fire_psi(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """psi(x) = log(|c x| + 1) (Li et al. 2023)."""
    return torch.log(torch.abs(c * x) + 1)


def fire_normalized_distance(q_pos: torch.Tensor, k_pos: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """psi(i - j) / (psi(max(L, i)) + eps) (B, Lq, Lk) for query positions i (B, Lq), key positions j (B, Lk)."""
    q = q_pos.to(torch.float32)
    rel = q[:, :, None] - k_pos.to(torch.float32)[:, None, :]
    return fire_psi(rel, c) / (fire_psi(torch.maximum(q, threshold), c)[:, :, None] + eps)


def fire_bias(f_theta: Callable[[torch.Tensor], torch.Tensor], normalized: torch.Tensor) -> torch.Tensor:
    """b = f_theta(normalised distance) (B, H, Lq, Lk); f_theta maps (..., 1) to (..., H)."""
    return f_theta(normalized[..., None]).permute(0, 3, 1, 2)


class FireBias(torch.nn.Module):
    """One layer's FIRE: the MLP f_theta, c, the threshold L = |l * L_0|, and the attention with it."""

    def __init__(self, heads: int, width: int, init_c: float, init_threshold: float, eps: float) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.ReLU(), torch.nn.Linear(width, heads))
        self.c = torch.nn.Parameter(torch.tensor(init_c))
        self.threshold_scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init_threshold", torch.tensor(init_threshold))
        self.eps = eps

    def threshold(self) -> torch.Tensor:
        return torch.abs(self.threshold_scale * self.init_threshold)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        normalized = fire_normalized_distance(call.q_pos, call.k_pos, self.c.float(), self.threshold().float(), self.eps)
        return softmax_attention(query, key, value, call, fire_bias(self.mlp, normalized.to(self.c.dtype)).float())


@register("fire")
@dataclass(frozen=True, kw_only=True)
class Fire(Encoding):
    """FIRE: a learned MLP of the log-transformed, query-normalised distance, per head."""

    paper: ClassVar[str] = ("Li et al. 2023, Functional Interpolation for Relative Positions Improves Long Context "
                            "Transformers")
    rope_based: ClassVar[bool] = False
    width: int = 32
    init_c: float = 0.1
    init_threshold: float = 512.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        integer(self.width, "fire: width", minimum=1, maximum=4096)
        number(self.init_c, "fire: init_c", above=0, at_most=1e6)
        number(self.init_threshold, "fire: init_threshold", above=0, at_most=MAX_COUNT)
        number(self.eps, "fire: eps", above=0, at_most=1)

    def install(self, model: torch.nn.Module) -> None:
        heads = model.config.num_attention_heads
        device = model.model.embed_tokens.weight.device
        attach(model, lambda _: FireBias(heads, self.width, float(self.init_c), float(self.init_threshold),
                                         float(self.eps)).to(device))
        remove_rotation(model)
        use_attention(model, self.name)
