"""Attention-level position maps: ReRoPE and Leaky ReRoPE (Su 2023); Self-Extend builds on them.

They keep ordinary RoPE inside a window w and remap far relative positions. Written as the
positions each side is rotated to in the far part, so that q_far(i) - k_far(j) is the new relative
position; the attention itself is ``rope_ext.two_part``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .base import Method, RopeSpec, check_int, check_number
from .registry import register

if TYPE_CHECKING:
    from ..attention import AttentionContext


def rerope_relative(rel: torch.Tensor, w: int) -> torch.Tensor:
    """ReRoPE (Su 2023, "Rectified Rotary Position Embeddings"): rel' = min(rel, w)."""
    return torch.clamp(rel, max=w)


def leaky_rerope_relative(rel: torch.Tensor, w: int, k: float) -> torch.Tensor:
    """Leaky ReRoPE (Su 2023): rel' = rel if rel < w else w + (rel - w) / k, with k > 1."""
    return torch.where(rel < w, rel.to(torch.float32), w + (rel - w) / k)


@dataclass(frozen=True, kw_only=True)
class WindowedMethod(Method):
    """A method with ordinary RoPE inside a window and remapped positions outside it."""

    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "deferred"
    window: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window", minimum=1)

    def bind(self, spec: RopeSpec) -> WindowedMethod:
        bound = super().bind(spec)
        if self.window >= bound.trained_length:
            raise ValueError(
                f"{self.name}: window={self.window} must be < the trained length {bound.trained_length} "
                f"(positions inside the window must have been seen in training)"
            )
        return bound

    far_keys_unrotated: ClassVar[bool] = False

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) positions of the far part, whose difference is the remapped distance.
        With ``far_keys_unrotated`` the key positions are all 0 (rotation by 0 is the identity)."""
        raise NotImplementedError

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q_near = ctx.rotate(query, ctx.q_pos, "q")
        if int((ctx.q_pos[:, -1] - ctx.k_pos[:, 0]).max()) < self.window:
            return ctx.base(q_near, ctx.rotate(key, ctx.k_pos, "k"), value)
        start = never_near_keys(ctx.q_pos, ctx.k_pos, self.window)
        if start == 0:
            k_near = ctx.rotate(key, ctx.k_pos, "k")
        else:
            k_near = torch.cat([key[:, :, :start], ctx.rotate(key[:, :, start:], ctx.k_pos[:, start:], "k_near")], dim=2)
        fq, fk = self.far_positions(ctx.q_pos, ctx.k_pos)
        q_far = ctx.rotate(query, fq, "q_far")
        if self.far_keys_unrotated and ctx.frequencies()[1] == 1.0:
            k_far = key
        else:
            k_far = ctx.rotate(key, fk, "k_far")
        return ctx.two_part(q_near, k_near, q_far, k_far, value, self.window)


def never_near_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> int:
    """How many leading keys lie outside the window of every query in every row (k_pos <= min_i
    q_pos_i - w): their near-part rotation is never read, so decoding rotates only the window's keys."""
    outside = k_pos <= q_pos.min(dim=1, keepdim=True).values - window
    return int(outside.to(torch.int32).cumprod(dim=1).sum(dim=1).min())


@register("rerope")
@dataclass(frozen=True, kw_only=True)
class ReRoPE(WindowedMethod):
    summary: ClassVar[str] = "ReRoPE: relative positions past the window are clipped to the window"
    reference: ClassVar[str] = "Su 2023, Rectified Rotary Position Embeddings (ReRoPE)"
    far_keys_unrotated: ClassVar[bool] = True

    def far_positions(self, q_pos, k_pos):
        return torch.full_like(q_pos, self.window), torch.zeros_like(k_pos)


@register("leaky_rerope")
@dataclass(frozen=True, kw_only=True)
class LeakyReRoPE(WindowedMethod):
    summary: ClassVar[str] = "Leaky ReRoPE: relative positions past the window grow with slope 1/k"
    reference: ClassVar[str] = "Su 2023, Rectified Rotary Position Embeddings (Leaky ReRoPE)"
    k: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "k", above=1.0)

    def far_positions(self, q_pos, k_pos):
        return self.window + (q_pos - self.window) / self.k, k_pos / self.k
