"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"): a neighbour window with ordinary RoPE and
floor-grouped positions beyond it, merged like ReRoPE's two parts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import check_int
from .registry import register
from .rerope import WindowedMethod


def self_extend_relative(q: torch.Tensor, k: torch.Tensor, G: int, w: int) -> torch.Tensor:
    """Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", eq. 3): rel' = rel if rel < w else
    floor(q/G) - floor(k/G) + w - floor(w/G)."""
    rel = q - k
    grouped = torch.div(q, G, rounding_mode="floor") - torch.div(k, G, rounding_mode="floor") + w - w // G
    return torch.where(rel < w, rel, grouped)


@register("self_extend")
@dataclass(frozen=True, kw_only=True)
class SelfExtend(WindowedMethod):
    summary: ClassVar[str] = "Self-Extend: neighbour window plus floor-grouped positions beyond it"
    reference: ClassVar[str] = "Jin et al. 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning"
    group_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "group_size", minimum=1)

    def far_positions(self, q_pos, k_pos):
        G, w = self.group_size, self.window
        return torch.div(q_pos, G, rounding_mode="floor") + w - w // G, torch.div(k_pos, G, rounding_mode="floor")
