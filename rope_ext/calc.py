"""The RoPE calculator: what a context length demands of the base, what a model can reach, which
parameters each method needs for a target length, and what that length costs.

  * base lower bound (Men et al. 2024)            -> ``rope_ext.calc_bound``
  * critical dimension, extrapolation limit (Liu et al. 2023), NTK base, YaRN correction range
                                                   -> ``rope_ext.calc_limits``
  * recommended method parameters                  -> ``rope_ext.calc_recommend``
  * KV-cache bytes and attention FLOPs             -> ``rope_ext.calc_budget``

This module re-exports them and composes them for one model config (``analyze_model``); the
``rope-ext calc`` command prints what it returns.
"""
from __future__ import annotations

import math
from typing import Any

from .calc_bound import (
    PUBLISHED_BOUNDS_D128,
    SU_BOUNDS_D128,
    BaseBound,
    BaseScan,
    base_lower_bound,
    base_lower_bounds,
    certified_base,
    check_head_dim,
    check_length,
    scan_bases,
    similarity_margin,
)
from .calc_budget import (
    AttentionShape,
    attention_flops,
    attention_shape,
    budget,
    bytes_per_element,
    decode_attention_flops,
    kv_cache_bytes,
    kv_cache_bytes_decompressed,
    projection_flops,
)
from .calc_limits import (
    base_for_extrapolation,
    critical_dimension,
    extrapolation_limit,
    ntk_base_for_factor,
    yarn_correction_dims,
)
from .calc_recommend import (
    RECOMMENDED_METHODS,
    Recommendation,
    config_rope_spec,
    model_rope_spec,
    recommend,
)
from .methods.base import RopeSpec

__all__ = [
    "PUBLISHED_BOUNDS_D128",
    "RECOMMENDED_METHODS",
    "SU_BOUNDS_D128",
    "AttentionShape",
    "BaseBound",
    "BaseScan",
    "Recommendation",
    "analyze_model",
    "attention_flops",
    "attention_shape",
    "base_for_extrapolation",
    "base_lower_bound",
    "base_lower_bounds",
    "budget",
    "bytes_per_element",
    "certified_base",
    "check_head_dim",
    "check_length",
    "config_rope_spec",
    "critical_dimension",
    "decode_attention_flops",
    "extrapolation_limit",
    "kv_cache_bytes",
    "kv_cache_bytes_decompressed",
    "model_rope_spec",
    "ntk_base_for_factor",
    "projection_flops",
    "recommend",
    "rope_spec_of",
    "scan_bases",
    "similarity_margin",
    "yarn_correction_dims",
]


def rope_spec_of(config: Any) -> tuple[RopeSpec, str | None, str | None]:
    """(spec, family, why not patchable): the spec ``rope_ext.patch`` would use for a supported
    family; for any other RoPE config, the spec read from the config alone and the reason."""
    try:
        family, spec = model_rope_spec(config)
        return spec, family, None
    except ValueError as err:
        return config_rope_spec(config), None, str(err)


def analyze_model(config: Any, target_length: int, *, batch_size: int = 1, dtype: str | float = "bfloat16",
                  bound: bool = False, per_decade: int = 50) -> dict[str, Any]:
    """Everything the calculator says about one model config and a target length, as plain data:
    RoPE facts, critical dimension and extrapolation limit, the Liu et al. base for the target,
    recommended parameters per method, and the budget (KV bytes, FLOPs) at the trained and target
    lengths. ``bound=True`` adds the Men et al. base lower bound at both lengths for the rotary dim
    (a scan: seconds)."""
    target = check_length(target_length, "target_length")
    spec, family, unsupported = rope_spec_of(config)
    d, b, L0 = spec.rotary_dim, spec.rope_theta, spec.trained_length
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
