"""The family-agnostic facts about a model's RoPE that every formula needs (read by ``rope_ext.facts``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeSpec:
    """The family-agnostic facts about a model's RoPE that the formulas need."""

    rope_theta: float
    rotary_dim: int
    trained_length: int
    head_dim: int
    num_heads: int

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
