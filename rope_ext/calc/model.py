"""Everything of the calculator that reads a model: a transformers config -> the RoPE facts
(``RopeSpec``) and attention shape the pure modules (``bound``, ``limits``, ``recommend``, ``budget``)
compute with, and ``analyze_model``, which composes them for one config and a target length.

The RoPE facts come from ``rope_ext.facts``, the one reader ``rope_ext.patch`` uses, so the
calculator and the patch see the same rotary dim, base and trained length.
"""
from __future__ import annotations

import math
from typing import Any

from ..facts import config_facts, main_spec, trained_length
from ..lengths import parse_length
from ..methods.base import RopeSpec
from .bound import base_lower_bounds
from .budget import AttentionShape, budget
from .limits import base_for_extrapolation, critical_dimension, extrapolation_limit
from .recommend import recommend


def model_rope_spec(config: Any) -> tuple[str, RopeSpec]:
    """(family name, RopeSpec of the main rotary table) of the unpatched model a transformers config
    describes, as ``rope_ext.patch`` reads it (``rope_ext.facts.config_facts``: the module tree on
    the meta device, no weights; a saved patched config read from its ``rope_ext`` block).
    Unsupported families raise ValueError."""
    facts = config_facts(config)
    return facts["family"].name, main_spec(facts["specs"])


def config_rope_spec(config: Any) -> RopeSpec:
    """A RopeSpec from the config alone, for families ``rope_ext.patch`` does not support (e.g.
    DeepSeek): rotary dim ``qk_rope_head_dim`` or head_dim * ``partial_rotary_factor``, base
    ``rope_parameters["rope_theta"]``, trained length ``rope_ext.facts.trained_length``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = getattr(config, "qk_rope_head_dim", None) or int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2 * 2
    if theta is None:
        raise ValueError(f"{type(config).__name__} has no rope_theta; not a RoPE model config")
    return RopeSpec(rope_theta=float(theta), rotary_dim=int(rotary), trained_length=trained_length(config),
                    head_dim=int(head_dim), num_heads=int(heads))


def rope_spec_of(config: Any) -> tuple[RopeSpec, str | None, str | None]:
    """(spec, family, why not patchable): the spec ``rope_ext.patch`` would use for a supported
    family; for any other RoPE config, the spec read from the config alone and the reason."""
    try:
        family, spec = model_rope_spec(config)
        return spec, family, None
    except ValueError as err:
        return config_rope_spec(config), None, str(err)


def _int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_shape(config: Any) -> AttentionShape:
    """Read an ``AttentionShape`` from a transformers config (text config of a multimodal one).
    KV heads: ``num_key_value_heads`` (Llama style), ``num_kv_heads`` (Falcon's new decoder
    architecture; the old one has 1 with ``multi_query``, else the query heads), else the query heads.
    Sliding layers: ``layer_types`` entries "sliding_attention" with ``sliding_window`` (Gemma 2/3), or every layer when only
    ``sliding_window`` is set and ``use_sliding_window`` is not False (Mistral)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads, hidden = (_int(config, "num_hidden_layers", "n_layer"), _int(config, "num_attention_heads", "n_head"),
                             _int(config, "hidden_size", "n_embd"))
    missing = [n for n, v in (("num_hidden_layers", layers), ("num_attention_heads", heads), ("hidden_size", hidden)) if v is None]
    if missing:
        raise ValueError(f"{type(config).__name__} lacks {', '.join(missing)}; cannot size its attention")
    window = _int(config, "sliding_window")
    layer_types = getattr(config, "layer_types", None)
    if window and layer_types:
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
    elif window and getattr(config, "use_sliding_window", True) is not False:
        sliding = layers
    else:
        sliding = 0
    window = window if sliding else None
    rank = _int(config, "kv_lora_rank")
    if rank is not None:
        rope, nope = _int(config, "qk_rope_head_dim"), _int(config, "qk_nope_head_dim") or 0
        v_dim = _int(config, "v_head_dim")
        if rope is None or v_dim is None:
            raise ValueError(f"{type(config).__name__} has kv_lora_rank (MLA) but lacks qk_rope_head_dim or v_head_dim")
        return AttentionShape("MLA", layers, heads, heads, nope + rope, v_dim, hidden, rank, rope,
                              _int(config, "q_lora_rank"), window, sliding)
    head_dim = _int(config, "head_dim") or hidden // heads
    if getattr(config, "new_decoder_architecture", None) is False:
        kv = 1 if getattr(config, "multi_query", False) else heads
    else:
        kv = _int(config, "num_key_value_heads", "num_kv_heads") or heads
    kind = "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"
    return AttentionShape(kind, layers, heads, kv, head_dim, head_dim, hidden, sliding_window=window, sliding_layers=sliding)


def analyze_model(config: Any, target_length: int | str, *, batch_size: int = 1, dtype: str | float = "bfloat16",
                  bound: bool = False, per_decade: int = 50, length_name: str = "target_length") -> dict[str, Any]:
    """Everything the calculator says about one model config and a target length, as plain data:
    RoPE facts, critical dimension and extrapolation limit, the Liu et al. base for the target,
    recommended parameters per method, and the budget (KV bytes, FLOPs) at the trained and target
    lengths. ``target_length`` takes rope_ext's length syntax (``rope_ext.lengths``: 32768, 32k, or
    4x the model's trained length); its errors name it ``length_name``. ``bound=True`` adds the Men
    et al. base lower bound at both lengths for the rotary dim (a scan: seconds)."""
    spec, family, unsupported = rope_spec_of(config)
    d, b, L0 = spec.rotary_dim, spec.rope_theta, spec.trained_length
    target = parse_length(target_length, L0, length_name)
    d_extra = critical_dimension(d, b, L0)
    shape = attention_shape(config)
    result: dict[str, Any] = {
        "model_type": getattr(config, "model_type", None), "family": family, "patch_support": unsupported or "supported",
        "head_dim": spec.head_dim, "rotary_dim": d, "rope_theta": b, "trained_length": L0, "target_length": target,
        "factor": target / L0, "critical_dim": d_extra, "extrapolation_limit": extrapolation_limit(d, d_extra, b),
        "liu_base_for_target": base_for_extrapolation(target, d, d_extra) if d_extra and target > 2 * math.pi else None,
        "attention": shape.to_dict(),
        "recommendations": [r.to_dict() for r in recommend(target, d, b, L0)],
        "budget": [budget(shape, n, batch_size, dtype) for n in sorted({L0, target})],
    }
    if bound:
        result["base_bound"] = [x.to_dict() for x in base_lower_bounds(sorted({L0, target}), d, per_decade=per_decade)]
    return result
