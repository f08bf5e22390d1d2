"""Recommended parameters of each method for a target length on a given model: the published
defaults where the papers give them, and the choices that keep every position inside the trained
range where a method is defined by a window. ``rope_ext.patch(model, rec.method, **rec.params)``
accepts every recommendation as is.

The model's facts (rotary dim, base, trained length) are read as ``rope_ext.patch`` reads them
(``rope_ext.patch.model_specs`` on the model's module tree built on the meta device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .calc_bound import check_base, check_head_dim, check_length
from .calc_limits import (
    base_for_extrapolation,
    critical_dimension,
    extrapolation_limit,
    ntk_base_for_factor,
    yarn_correction_dims,
)
from .methods.base import RopeSpec
from .methods.frequency import yarn_mscale
from .methods.rerope import leaky_rerope_relative
from .methods.self_extend import self_extend_relative

YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0       # Peng et al. 2023 (YaRN) sec. 3.2, for Llama
LLAMA3_LOW, LLAMA3_HIGH = 1.0, 4.0               # Llama 3.1's rope_scaling (factor 8, L0 8192)
WINDOW_FRACTION = 4                               # window = trained length / 4 (see recommend)
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


def leaky_rerope_k(target_length: int, window: int, trained_length: int) -> float:
    """The leak k that maps the farthest distance T - 1 to at most L0 - 1 (Leaky ReRoPE, Su 2023:
    rel' = w + (rel - w) / k): k = (T - 1 - w) / (L0 - 1 - w), rounded up to 2 decimals, at least 2
    (any k > 1 keeps a target inside the trained length in range)."""
    k = (target_length - 1 - window) / (trained_length - 1 - window)
    return max(2.0, math.ceil(k * 100) / 100)


def self_extend_group(target_length: int, window: int, trained_length: int) -> int:
    """The smallest group size G whose largest remapped distance fits the trained length: Jin et al.
    2024 ("LLM Maybe LongLM", sec. 3) give the extended window (L0 - w) * G + w, i.e.
    G >= (T - w) / (L0 - w); the floor in their eq. 3 can need one more, so the exact condition
    floor((T - 1) / G) + w - floor(w / G) <= L0 - 1 is checked upward from one below (no smaller G
    can meet it: the left side is at least (T - 1 - w) / G + w - 1)."""
    G = max(1, math.ceil((target_length - window) / (trained_length - window)) - 1)
    while (target_length - 1) // G + window - window // G > trained_length - 1:
        G += 1
    return G


def recommend(target_length: int, rotary_dim: int, rope_theta: float, trained_length: int) -> list[Recommendation]:
    """Parameters for each RoPE-extension method to reach ``target_length`` tokens on a model with
    ``rotary_dim``, base ``rope_theta`` and trained length L0. Frequency methods get the scale
    s = max(1, T / L0). Windowed methods get w = L0 / 4: ReRoPE's reference run on Llama 2 (L0 4096)
    used w = 1024 (Su 2023, github.com/bojone/rerope README, "ReRoPE-w1024"), and Self-Extend's
    reference example uses a neighbour window of 1024 on Llama 2 (Jin et al. 2024,
    github.com/datamllab/LongLM). ReRoPE and Leaky ReRoPE get ``logn=True`` as in Su's patches.
    Every registered method for pretrained RoPE models is covered except ``none``; ALiBi and NoPE
    serve models trained with them and get no recommendation."""
    T, d = check_length(target_length, "target_length"), check_head_dim(rotary_dim)
    b, L0 = check_base(rope_theta, "rope_theta"), check_length(trained_length, "trained_length")
    if d < 4:
        raise ValueError(f"rotary_dim must be >= 4 to recommend parameters (NTK uses d / (d - 2)), got {d}")
    if L0 < 2 * WINDOW_FRACTION:
        raise ValueError(f"trained_length must be >= {2 * WINDOW_FRACTION} tokens to recommend a window, got {L0}")
    s = max(1.0, T / L0)
    within = "; the target is within the trained length, so this is the identity" if T <= L0 else ""
    d_extra = critical_dimension(d, b, L0)
    ntk_b = ntk_base_for_factor(b, s, d)
    liu_base = base_for_extrapolation(T, d, d_extra) if d_extra and T > 2 * math.pi else b
    liu_factor = max(1.0, (liu_base / b) ** ((d - 2) / d))
    yarn = yarn_correction_dims(YARN_BETA_FAST, YARN_BETA_SLOW, d, b, L0)
    w = L0 // WINDOW_FRACTION
    k = leaky_rerope_k(T, w, L0)
    G = self_extend_group(T, w, L0)
    far_leaky = float(leaky_rerope_relative(torch.tensor(T - 1), w, k))
    far_se = int(self_extend_relative(torch.tensor(T - 1), torch.tensor(0), G, w))
    return [
        Recommendation("pi", {"factor": s}, f"positions divided by {s:g}; Chen et al. fine-tune about 1000 steps to "
                       f"recover quality at the new length{within}",
                       "Chen et al. 2023, Extending Context Window of LLMs via Positional Interpolation, eq. 4"),
        Recommendation("ntk", {"factor": s}, f"base {b:g} -> {ntk_b:.4g} (b s^(d/(d-2))); with it the critical dimension's "
                       f"extrapolation limit (Liu et al.) is {extrapolation_limit(d, d_extra, ntk_b):.4g} tokens, and reaches the "
                       f"target with factor {liu_factor:.3g}: NTK needs a factor above T/L0 (YaRN sec. 3.1){within}",
                       "bloc97 2023; Peng et al. 2023 (YaRN) eq. 16; Liu et al. 2023 Theorem 2",
                       {"new_base": ntk_b, "critical_dim": d_extra, "liu_base": liu_base, "liu_factor": liu_factor}),
        Recommendation("dynamic_ntk", {"factor": 1.0}, "factor 1: the base is b (L/L0)^(d/(d-2)) at the current length L "
                       "(s = max(1, L/L0), YaRN sec. 3.3); a larger factor over-scales (s^2 - s + 1 at L = s L0)",
                       "emozilla 2023; Peng et al. 2023 (YaRN) sec. 3.3"),
        Recommendation("ntk_by_parts", {"factor": s, "alpha": 1.0, "beta": 32.0}, f"alpha 1, beta 32 as for Llama in "
                       f"the YaRN paper{within}", "Peng et al. 2023 (YaRN) sec. 3.2, eq. 17-19"),
        Recommendation("yarn", {"factor": s, "beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW},
                       f"dimension pairs < {yarn['low']} kept, > {yarn['high']} interpolated (of {d // 2}); attention "
                       f"factor 0.1 ln(s) + 1 = {yarn_mscale(s):.4f}{within}",
                       "Peng et al. 2023, YaRN, sec. 3.2-3.4", {"correction_range": yarn, "attention_factor": yarn_mscale(s)}),
        Recommendation("dynamic_yarn", {"factor": 1.0, "beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW},
                       "factor 1: YaRN with s = max(1, L/L0) at the current length L", "Peng et al. 2023 (YaRN) sec. 3.3"),
        Recommendation("llama3", {"factor": s, "low_freq_factor": LLAMA3_LOW, "high_freq_factor": LLAMA3_HIGH},
                       f"wavelengths < L0/4 = {L0 / LLAMA3_HIGH:g} kept, > L0 = {L0 / LLAMA3_LOW:g} divided by s, smooth "
                       f"between (Llama 3.1 used factor 8 on L0 8192){within}", "Meta 2024, The Llama 3 Herd of Models"),
        Recommendation("rerope", {"window": w, "logn": True}, f"window L0/4 = {w} (Su's Llama 2 run: w 1024 of 4096); "
                       "every distance past it is read as w, so any length stays in range; costs two attention parts",
                       "Su 2023, Rectified Rotary Position Embeddings, github.com/bojone/rerope"),
        Recommendation("leaky_rerope", {"window": w, "k": k, "logn": True}, f"window L0/4 = {w}; k {k:g} maps the farthest "
                       f"distance {T - 1} to {far_leaky:.1f} <= L0 - 1 (Su's patch: w 512, k 16 on L0 4096)",
                       "Su 2023, Rectified Rotary Position Embeddings (Leaky ReRoPE)", {"max_position": far_leaky}),
        Recommendation("self_extend", {"group_size": G, "window": w}, f"neighbour window L0/4 = {w}; group {G}: the "
                       f"farthest distance {T - 1} maps to {far_se} <= L0 - 1",
                       "Jin et al. 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning, eq. 3",
                       {"max_position": far_se}),
    ]


def model_rope_spec(config: Any) -> tuple[str, RopeSpec]:
    """(family name, RopeSpec of the main rotary table) of the unpatched model a transformers config
    describes, as ``rope_ext.patch`` reads it (``rope_ext.models.rope_facts``: the module tree on the
    meta device, no weights; a saved patched config read from its ``rope_ext`` block). Unsupported
    families raise ValueError."""
    from rope_ext.models import rope_facts

    facts = rope_facts(config)
    specs = facts["specs"]
    return facts["family"].name, specs.get("full_attention") or next(iter(specs.values()))


def config_rope_spec(config: Any) -> RopeSpec:
    """A RopeSpec from the config alone, for families ``rope_ext.patch`` does not support (e.g.
    DeepSeek): rotary dim ``qk_rope_head_dim`` or head_dim * ``partial_rotary_factor``, base
    ``rope_parameters["rope_theta"]``, trained length as in the contributing rules."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = getattr(config, "qk_rope_head_dim", None) or int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2 * 2
    trained = params.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
    if theta is None or not trained:
        raise ValueError(f"{type(config).__name__} has no rope_theta or trained length; not a RoPE model config")
    return RopeSpec(rope_theta=float(theta), rotary_dim=int(rotary), trained_length=int(trained), head_dim=int(head_dim), num_heads=int(heads))
