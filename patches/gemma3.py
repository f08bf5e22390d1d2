"""Gemma 3: one rotary module with a table per layer type (local sliding layers use their own base)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .family import Family


@dataclass(frozen=True)
class Gemma3(Family):
    def layer_types(self, rotary: nn.Module) -> list[str | None]:
        return list(rotary.layer_types)

    def layer_type_of(self, attention: nn.Module) -> str | None:
        return attention.layer_type


FAMILY = Gemma3("gemma3", ("gemma3_text",), notes="per-layer-type rotary tables; softcap-free")
