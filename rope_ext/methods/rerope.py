"""Attention-level position maps: ReRoPE and Leaky ReRoPE (Su 2023); Self-Extend builds on them.

They keep ordinary RoPE inside a window w and remap far relative positions. Written as the
positions each side is rotated to in the far part, so that q_far(i) - k_far(j) is the new relative
position; the attention itself is the two-part kernel (``rope_ext.kernels.two_part_merged``: two
SDPA calls merged by log-sum-exp; ``two_part_reference``: query-blocked score matrices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.two_part_merged import two_part_attention_merged
from ..kernels.two_part_reference import two_part_attention
from .base import Method, RopeSpec, check_int, check_number
from .context import AttentionContext
from .registry import register

TWO_PART_KERNELS = {"merged": two_part_attention_merged, "reference": two_part_attention}


def leaky_rerope_relative(rel: torch.Tensor, w: int, k: float) -> torch.Tensor:
    """Leaky ReRoPE (Su 2023): rel' = rel if rel < w else w + (rel - w) / k, with k > 1."""
    return torch.where(rel < w, rel.to(torch.float32), w + (rel - w) / k)


def leaky_rerope_k(target_length: int, window: int, trained_length: int) -> float:
    """The leak k that maps the farthest distance T - 1 to at most L0 - 1 (Leaky ReRoPE, Su 2023:
    rel' = w + (rel - w) / k): k = (T - 1 - w) / (L0 - 1 - w), rounded up to 2 decimals, at least 2
    (any k > 1 keeps a target inside the trained length in range)."""
    if not 0 < window < trained_length - 1:
        raise ValueError(f"leaky_rerope: window={window} must be in [1, trained length - 2 = {trained_length - 2}]")
    k = (target_length - 1 - window) / (trained_length - 1 - window)
    return max(2.0, math.ceil(k * 100) / 100)


WINDOW_FRACTION = 2  # default window L0 / 2: on SmolLM2 at 2x-4x it reaches the sliding-window perplexity


@dataclass(frozen=True, kw_only=True)
class WindowedMethod(Method):
    """A method with ordinary RoPE inside a window and remapped positions outside it."""

    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "deferred"
    window: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window", minimum=1)

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """Window L0 / 2 unless given (Su's ReRoPE run used L0 / 4 on Llama 2 with log-n; L0 / 2
        keeps twice the exact neighbourhood and reached the sliding-window perplexity on SmolLM2)."""
        params = super().defaults_for(spec, length, **given)
        params.setdefault("window", cls.trained(spec, params) // WINDOW_FRACTION)
        return params

    @staticmethod
    def trained(spec: RopeSpec, params: dict[str, Any]) -> int:
        """The trained length a parameter set binds to (its own original_max_position_embeddings, else the model's)."""
        return params.get("original_max_position_embeddings") or spec.trained_length

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
        unrotated = self.far_keys_unrotated and ctx.frequencies()[1] == 1.0
        if unrotated and query.numel() > key.numel():
            # far queries all at w: (R(w) q) . k = q . (R(-w) k); rotate the smaller side (GQA prefill: k)
            q_far, k_far = query, ctx.rotate(key, torch.full_like(ctx.k_pos, -self.window), "k_far_folded")
        elif unrotated:
            q_far, k_far = ctx.rotate(query, fq, "q_far"), key
        else:
            q_far, k_far = ctx.rotate(query, fq, "q_far"), ctx.rotate(key, fk, "k_far")
        allowed = None if ctx.mask is None else ctx.allowed()
        return TWO_PART_KERNELS[ctx.two_part_impl](q_near, k_near, q_far, k_far, value, ctx.q_pos, ctx.k_pos,
                                                   self.window, allowed, ctx.scaling, ctx.softcap)


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

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """k from ``leaky_rerope_k``: the farthest distance of ``length`` stays inside the trained length."""
        params = super().defaults_for(spec, length, **given)
        if isinstance(params["window"], int):
            params.setdefault("k", leaky_rerope_k(length, params["window"], cls.trained(spec, params)))
        return params

    def far_positions(self, q_pos, k_pos):
        return self.window + (q_pos - self.window) / self.k, k_pos / self.k
