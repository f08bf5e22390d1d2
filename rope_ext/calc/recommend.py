"""Recommended parameters of each method for a target length on a given model: the published
defaults where the papers give them, and the choices that keep every position inside the trained
range where a method is defined by a window. ``rope_ext.patch(model, rec.method, **rec.params)``
accepts every recommendation as is. Pure numbers: ``rope_ext.calc.model`` reads a model's rotary
dim, base and trained length.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods import RopeSpec, registry
from ..methods.frequency import yarn_mscale
from ..methods.rerope import WINDOW_FRACTION, leaky_rerope_relative
from ..methods.self_extend import self_extend_relative
from .bound import check_base, check_head_dim, check_length
from .limits import (
    base_for_extrapolation,
    critical_dimension,
    extrapolation_limit,
    ntk_base_for_factor,
    yarn_correction_dims,
)

RECOMMENDED_METHODS = ("pi", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn", "dynamic_yarn", "llama3", "rerope",
                       "leaky_rerope", "self_extend")


@dataclass(frozen=True)
class Recommendation:
    """One method's parameters for a target length, with why, and the source."""

    method: str
    params: dict[str, Any]
    note: str
    reference: str
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params), "note": self.note, "reference": self.reference,
                "facts": dict(self.facts)}


def recommend(target_length: int, rotary_dim: int, rope_theta: float, trained_length: int) -> list[Recommendation]:
    """Parameters for each RoPE-extension method to reach ``target_length`` tokens on a model with
    ``rotary_dim``, base ``rope_theta`` and trained length L0: each method's own ``defaults_for``
    (the one source that eval and LongLoRA use too) beside its fixed dataclass defaults, with the
    reasoning and the published reference. Every registered method for pretrained RoPE models is
    covered except ``none``; ALiBi and NoPE serve models trained with them and get no recommendation."""
    T, d = check_length(target_length, "target_length"), check_head_dim(rotary_dim, "rotary_dim")
    b, L0 = check_base(rope_theta, "rope_theta"), check_length(trained_length, "trained_length")
    if d < 4:
        raise ValueError(f"rotary_dim must be >= 4 to recommend parameters (NTK uses d / (d - 2)), got {d}")
    if L0 < 2 * WINDOW_FRACTION:
        raise ValueError(f"trained_length must be >= {2 * WINDOW_FRACTION} tokens to recommend a window, got {L0}")
    spec = RopeSpec(rope_theta=b, rotary_dim=d, trained_length=L0, head_dim=d, num_heads=1)
    params = {name: {**_field_defaults(name), **registry.get(name).defaults_for(spec, T)} for name in RECOMMENDED_METHODS}
    s = params["pi"]["factor"]
    within = "; the target is within the trained length, so this is the identity" if T <= L0 else ""
    d_extra = critical_dimension(d, b, L0)
    ntk_b = ntk_base_for_factor(b, s, d)
    liu_base = base_for_extrapolation(T, d, d_extra) if d_extra and T > 2 * math.pi else b
    liu_factor = max(1.0, (liu_base / b) ** ((d - 2) / d))
    yarn_p, llama3 = params["yarn"], params["llama3"]
    yarn = yarn_correction_dims(yarn_p["beta_fast"], yarn_p["beta_slow"], d, b, L0)
    w, k = params["leaky_rerope"]["window"], params["leaky_rerope"]["k"]
    G = params["self_extend"]["group_size"]
    far_leaky = float(leaky_rerope_relative(torch.tensor(T - 1), w, k))
    far_se = int(self_extend_relative(torch.tensor(T - 1), torch.tensor(0), G, w))
    low, high = llama3["low_freq_factor"], llama3["high_freq_factor"]
    return [
        Recommendation("pi", params["pi"], f"positions divided by {s:g}; Chen et al. fine-tune about 1000 steps to "
                       f"recover quality at the new length{within}",
                       "Chen et al. 2023, Extending Context Window of LLMs via Positional Interpolation, eq. 4"),
        Recommendation("ntk", params["ntk"], f"base {b:g} -> {ntk_b:.4g} (b s^(d/(d-2))); with it the critical dimension's "
                       f"extrapolation limit (Liu et al.) is {extrapolation_limit(d, d_extra, ntk_b):.4g} tokens, and reaches the "
                       f"target with factor {liu_factor:.3g}: NTK needs a factor above T/L0 (YaRN sec. 3.1){within}",
                       "bloc97 2023; Peng et al. 2023 (YaRN) eq. 16; Liu et al. 2023 Theorem 2",
                       {"new_base": ntk_b, "critical_dim": d_extra, "liu_base": liu_base, "liu_factor": liu_factor}),
        Recommendation("dynamic_ntk", params["dynamic_ntk"], "factor 1: the base is b (L/L0)^(d/(d-2)) at the current length L "
                       "(s = max(1, L/L0), YaRN sec. 3.3); a larger factor over-scales (s^2 - s + 1 at L = s L0)",
                       "emozilla 2023; Peng et al. 2023 (YaRN) sec. 3.3"),
        Recommendation("ntk_by_parts", params["ntk_by_parts"], f"alpha 1, beta 32 as for Llama in "
                       f"the YaRN paper{within}", "Peng et al. 2023 (YaRN) sec. 3.2, eq. 17-19"),
        Recommendation("yarn", yarn_p,
                       f"dimension pairs < {yarn['low']} kept, > {yarn['high']} interpolated (of {d // 2}); attention "
                       f"factor 0.1 ln(s) + 1 = {yarn_mscale(s):.4f}{within}",
                       "Peng et al. 2023, YaRN, sec. 3.2-3.4", {"correction_range": yarn, "attention_factor": yarn_mscale(s)}),
        Recommendation("dynamic_yarn", params["dynamic_yarn"],
                       "factor 1: YaRN with s = max(1, L/L0) at the current length L", "Peng et al. 2023 (YaRN) sec. 3.3"),
        Recommendation("llama3", llama3,
                       f"wavelengths < L0/{high:g} = {L0 / high:g} kept, > L0/{low:g} = {L0 / low:g} divided by s, smooth "
                       f"between (Llama 3.1 used factor 8 on L0 8192){within}", "Meta 2024, The Llama 3 Herd of Models"),
        Recommendation("rerope", params["rerope"], f"window L0/{WINDOW_FRACTION} = {params['rerope']['window']} (Su's Llama 2 run: w 1024 of 4096 with log-n); "
                       "every distance past it is read as w, so any length stays in range; costs two attention parts",
                       "Su 2023, Rectified Rotary Position Embeddings, github.com/bojone/rerope"),
        Recommendation("leaky_rerope", params["leaky_rerope"], f"window L0/{WINDOW_FRACTION} = {w}; k {k:g} maps the farthest "
                       f"distance {T - 1} to {far_leaky:.1f} <= L0 - 1 (Su's patch: w 512, k 16 on L0 4096)",
                       "Su 2023, Rectified Rotary Position Embeddings (Leaky ReRoPE)", {"max_position": far_leaky}),
        Recommendation("self_extend", params["self_extend"], f"neighbour window L0/{WINDOW_FRACTION} = {w}; group {G}: the "
                       f"farthest distance {T - 1} maps to {far_se} <= L0 - 1",
                       "Jin et al. 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning, eq. 3",
                       {"max_position": far_se}),
    ]


def _field_defaults(name: str) -> dict[str, Any]:
    """A method's fixed defaults (its dataclass fields' values), shown beside the length-dependent ones."""
    cls = registry.get(name)
    skip = ("logn", "original_max_position_embeddings", "factor", "target_length", "base", "attention_factor")
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in skip and f.default is not dataclasses.MISSING and f.default is not None}
