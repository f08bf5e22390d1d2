"""Position encodings that replace RoPE: ALiBi (Press et al. 2022): no rotation, a linear bias
-m_h (i - j); and NoPE (no position signal but the causal mask).

Both replace RoPE, so they serve models trained with them (the eval lab trains them through this same
patch); applied to a pretrained RoPE model it simply removes the positions it learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validate import MAX_ALIBI_BIAS
from .base import Method, check_number
from .context import AttentionContext
from .registry import register


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """Head slopes m_h (Press et al. 2022, sec. 3): the geometric series 2^(-max_bias * h / n),
    h = 1..n, for n a power of two; otherwise the n' = 2^floor(log2 n) series followed by every
    other term of the 2n' series, as in the paper's reference code."""
    if num_heads < 1:
        raise ValueError(f"alibi: num_heads must be >= 1, got {num_heads}")

    def series(n: int) -> list[float]:
        return [2 ** (-max_bias * h / n) for h in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = series(closest)
    if closest < num_heads:
        slopes += series(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bias (B, H, Lq, Lk) = -m_h * (p_i - p_j) (Press et al. 2022, eq. in sec. 3)."""
    rel = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).to(torch.float32)
    return -slopes.to(q_pos.device)[None, :, None, None] * rel


@register("alibi")
@dataclass(frozen=True, kw_only=True)
class ALiBi(Method):
    summary: ClassVar[str] = "ALiBi: no rotation, linear distance bias per head (for models trained with it)"
    reference: ClassVar[str] = "Press et al. 2022, Train Short, Test Long: Attention with Linear Biases"
    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "none"
    for_pretrained_rope: ClassVar[bool] = False
    max_bias: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "max_bias", above=0.0, at_most=MAX_ALIBI_BIAS)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        bias = alibi_bias(alibi_slopes(query.shape[1], self.max_bias), ctx.q_pos, ctx.k_pos)
        mask = bias.masked_fill(~ctx.allowed(), torch.finfo(query.dtype).min).to(query.dtype)
        return ctx.base(query, key, value, mask=mask)


@register("nope")
@dataclass(frozen=True, kw_only=True)
class NoPE(Method):
    summary: ClassVar[str] = "NoPE: no position encoding at all; causal masking alone (for models trained with it)"
    reference: ClassVar[str] = "Kazemnejad et al. 2023, The Impact of Positional Encoding on Length Generalization in Transformers"
    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "none"
    for_pretrained_rope: ClassVar[bool] = False

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return ctx.base(query, key, value)
