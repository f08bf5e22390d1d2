"""The one reader of a model's RoPE facts: trained length, head dim, rotary dims, base, layer types.

Everything that needs them -- the patch, eval, the calculator, LongLoRA, ``rope-ext info`` -- reads
them here, so they agree:
  * ``trained_length(config)``: ``rope_parameters["original_max_position_embeddings"]`` when present,
    else ``max_position_embeddings`` (of the full-attention table where layer types differ);
  * a config that rope_ext patched (or saved patched) is read as it was before the patch: its
    ``rope_ext`` block keeps the original rope_parameters, max_position_embeddings and the trained
    length the method bound to (``original_rope_parameters``);
  * ``model_specs(model)``: a ``RopeSpec`` per rotary table of a loaded model (one, or one per layer
    type), its rotary dim read from the rotary module's own frequencies;
  * ``config_facts(config)``: the same for a config alone, on a module tree built on the meta device;
  * ``main_spec(specs)``: the table a method binds to (full attention's, else the only one);
    ``rope_spec(model)``: that table's spec for a loaded model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .methods.base import RopeSpec

MAIN_LAYER_TYPE = "full_attention"


def rope_tables(rope_parameters: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    """{layer type: its table} of a config's rope_parameters (Gemma 3: one per layer type), or
    {None: the only table}."""
    if rope_parameters and all(isinstance(v, dict) for v in rope_parameters.values()):
        return dict(rope_parameters)
    return {None: rope_parameters}


def _block(config: Any) -> dict[str, Any]:
    block = getattr(config, "rope_ext", None)
    return block if isinstance(block, dict) else {}


def original_rope_parameters(config: Any) -> dict[str, Any]:
    """``config.rope_parameters`` as they were before a rope_ext patch (the patch writes the method's)."""
    original = _block(config).get("original_rope_parameters")
    return original if isinstance(original, dict) else getattr(config, "rope_parameters", None) or {}


def original_max_position_embeddings(config: Any) -> int | None:
    """``config.max_position_embeddings`` as it was before a rope_ext patch set the target length."""
    value = _block(config).get("original_max_position_embeddings")
    return value if isinstance(value, int) else getattr(config, "max_position_embeddings", None)


def _table_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope_parameters of one table (``layer_type``), or of the main one when there are several."""
    tables = rope_tables(original_rope_parameters(config))
    if None in tables:
        return tables[None]
    if layer_type is None:
        layer_type = MAIN_LAYER_TYPE if MAIN_LAYER_TYPE in tables else next(iter(tables))
    return tables[layer_type]


def trained_length(config: Any, layer_type: str | None = None) -> int:
    """The context length a model was trained at (see the module docstring)."""
    bound = _block(config).get("params", {})
    value = bound.get("original_max_position_embeddings") if isinstance(bound, dict) else None
    value = value or _table_parameters(config, layer_type).get("original_max_position_embeddings")
    value = value or original_max_position_embeddings(config)
    if not value:
        raise ValueError(
            "the model's trained length is unknown: config has neither max_position_embeddings nor "
            "rope_parameters['original_max_position_embeddings']; pass original_max_position_embeddings="
        )
    return int(value)


def main_spec(specs: dict[str | None, RopeSpec]) -> RopeSpec:
    """The table a method binds to: full attention's where layer types differ, else the only one."""
    return specs.get(MAIN_LAYER_TYPE) or next(iter(specs.values()))


def rope_spec(model: nn.Module) -> RopeSpec:
    """The main RopeSpec of a loaded (unpatched or patched) model: what its methods bind to."""
    from rope_ext.patch import current

    handle = current(model)
    return main_spec(handle.specs if handle is not None else model_specs(model))


def model_specs(model: nn.Module, family: Any = None, trained: int | None = None) -> dict[str | None, RopeSpec]:
    """RopeSpec per rotary table of a loaded model; ``trained`` overrides the config's trained length."""
    from rope_ext.patches import family_for

    family = family or family_for(model)
    config = model.config
    rotaries = family.rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module; it does not use RoPE")
    rotary = rotaries[0]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    specs = {}
    for layer_type in family.layer_types(rotary):
        params = _table_parameters(config, layer_type)
        inv_freq = getattr(rotary, f"{family.buffer_prefix(layer_type)}original_inv_freq")
        specs[layer_type] = RopeSpec(
            rope_theta=float(params["rope_theta"]), rotary_dim=2 * inv_freq.numel(),
            trained_length=int(trained or trained_length(config, layer_type)), head_dim=int(head_dim),
            num_heads=int(config.num_attention_heads),
        )
    return specs


def meta_model(config: Any) -> nn.Module:
    """The model's module tree on the meta device (no weight memory); transformers picks the
    attention implementation the config asks for, or its default for the architecture."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def config_facts(config: Any) -> dict[str, Any]:
    """Family, per-table RopeSpec and attention implementation of the (unpatched) model a config
    describes. A saved patched config is read as ``rope_ext.load`` reads it: its specs come from the
    ``original_rope_parameters`` and trained length kept in its ``rope_ext`` block."""
    from rope_ext.patches import family_for

    base_config = copy.deepcopy(config)
    if _block(config):
        base_config.rope_parameters = copy.deepcopy(original_rope_parameters(config))
        base_config.max_position_embeddings = original_max_position_embeddings(config)
    model = meta_model(base_config)
    family = family_for(model)
    specs = model_specs(model, family)
    return {"family": family, "specs": specs, "attn_implementation": model.config._attn_implementation}
