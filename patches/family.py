"""The generic description of a model family; subclasses override only what differs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """Where a family keeps RoPE and attention. Defaults fit every transformers 5.x decoder built
    from the Llama template (one ``*RotaryEmbedding`` module, attention through AttentionInterface)."""

    name: str
    model_types: tuple[str, ...]
    attention_interface: bool = True
    notes: str = ""

    def rotary_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [
            m for m in model.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
        ]

    def layer_types(self, rotary: nn.Module) -> list[str | None]:
        """Rotary tables a rotary module keeps: one (None), or one per layer type (Gemma 3)."""
        return [None]

    def layer_type_of(self, attention: nn.Module) -> str | None:
        return None

    def buffer_prefix(self, layer_type: str | None) -> str:
        return "" if layer_type is None else f"{layer_type}_"


def family_for(model: nn.Module) -> Family:
    """The Family of a loaded model, or a clear error naming what is supported."""
    from . import FAMILIES

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    has_rope = any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules())
    what = "has no RoPE (no rotary embedding module)" if not has_rope else "is not a supported family yet"
    raise ValueError(
        f"model type {model_type!r} ({type(model).__name__}) {what}; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def supported_model_types() -> list[str]:
    from . import FAMILIES

    return sorted(FAMILIES)
