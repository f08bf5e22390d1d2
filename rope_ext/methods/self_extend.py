"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"): a neighbour window with ordinary RoPE and
floor-grouped positions beyond it, merged like ReRoPE's two parts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import RopeSpec, check_int
from .registry import register
from .rerope import WindowedMethod


def self_extend_relative(q: torch.Tensor, k: torch.Tensor, G: int, w: int) -> torch.Tensor:
    """Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", eq. 3): rel' = rel if rel < w else
    floor(q/G) - floor(k/G) + w - floor(w/G)."""
    rel = q - k
    grouped = torch.div(q, G, rounding_mode="floor") - torch.div(k, G, rounding_mode="floor") + w - w // G
    return torch.where(rel < w, rel, grouped)


def self_extend_group(target_length: int, window: int, trained_length: int) -> int:
    """The smallest group size G whose largest remapped distance fits the trained length: Jin et al.
    2024 ("LLM Maybe LongLM", sec. 3) give the extended window (L0 - w) * G + w, i.e.
    G >= (T - w) / (L0 - w); the floor in their eq. 3 can need one more, so the exact condition
    floor((T - 1) / G) + w - floor(w / G) <= L0 - 1 is checked upward from one below (no smaller G
    can meet it: the left side is at least (T - 1 - w) / G + w - 1)."""
    if not 0 < window < trained_length:
        raise ValueError(f"self_extend: window={window} must be in [1, trained length - 1 = {trained_length - 1}]")
    G = max(1, math.ceil((target_length - window) / (trained_length - window)) - 1)
    while (target_length - 1) // G + window - window // G > trained_length - 1:
        G += 1
    return G


@register("self_extend")
@dataclass(frozen=True, kw_only=True)
class SelfExtend(WindowedMethod):
    summary: ClassVar[str] = "Self-Extend: neighbour window plus floor-grouped positions beyond it"
    reference: ClassVar[str] = "Jin et al. 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning"
    group_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "group_size", minimum=1)

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """group_size from ``self_extend_group``: the farthest distance of ``length`` stays in range."""
        params = super().defaults_for(spec, length, **given)
        if isinstance(params["window"], int):
            params.setdefault("group_size", self_extend_group(length, params["window"], cls.trained(spec, params)))
        return params

    def far_positions(self, q_pos, k_pos):
        G, w = self.group_size, self.window
        return torch.div(q_pos, G, rounding_mode="floor") + w - w // G, torch.div(k_pos, G, rounding_mode="floor")
