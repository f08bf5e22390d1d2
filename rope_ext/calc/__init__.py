"""The RoPE calculator: what a context length demands of the base, what a model can reach, which
parameters each method needs for a target length, and what that length costs.

  * base lower bound (Men et al. 2024)            -> ``rope_ext.calc.bound``
  * critical dimension, extrapolation limit (Liu et al. 2023), NTK base, YaRN correction range
                                                   -> ``rope_ext.calc.limits``
  * recommended method parameters                  -> ``rope_ext.calc.recommend``
  * KV-cache bytes and attention FLOPs             -> ``rope_ext.calc.budget``
  * the base bound as a PNG                        -> ``rope_ext.calc.plot``
  * reading a model config, and ``analyze_model``  -> ``rope_ext.calc.model``

All but ``model`` are pure functions of numbers. This package re-exports them; the ``rope-ext calc``
command prints what ``analyze_model`` returns.
"""
from __future__ import annotations

from .bound import (
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
from .budget import (
    AttentionShape,
    attention_flops,
    budget,
    bytes_per_element,
    decode_attention_flops,
    kv_cache_bytes,
    kv_cache_bytes_decompressed,
    projection_flops,
)
from .limits import (
    base_for_extrapolation,
    critical_dimension,
    extrapolation_limit,
    ntk_base_for_factor,
    yarn_correction_dims,
)
from .model import analyze_model, attention_shape, config_rope_spec, model_rope_spec, rope_spec_of
from .recommend import RECOMMENDED_METHODS, Choice, Recommendation, choose, recommend

__all__ = [
    "PUBLISHED_BOUNDS_D128",
    "RECOMMENDED_METHODS",
    "SU_BOUNDS_D128",
    "AttentionShape",
    "BaseBound",
    "BaseScan",
    "Choice",
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
    "choose",
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
