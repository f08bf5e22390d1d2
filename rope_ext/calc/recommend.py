"""Recommended parameters of each method for a target length on a given model: the published
defaults where the papers give them, and the choices that keep every position inside the trained
range where a method is defined by a window. ``rope_ext.patch(model, rec.method, **rec.params)``
accepts every recommendation as is. Pure numbers: ``rope_ext.calc.model`` reads a model's rotary
dim, base and trained length.

``choose`` picks one method for the user (``rope-ext recommend``) by a fixed rule, with the
parameters from ``recommend`` and the runners-up; see its docstring for the rule and its evidence.
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
from ..methods.dca import dca_max_distance
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
                       "leaky_rerope", "self_extend", "dca")


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
    dca_p = params["dca"]
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
        Recommendation("dca", params["dca"], f"chunks of {dca_p['chunk_size'] - dca_p['local_window']} positions: a key sits at "
                       f"its place in its chunk and a query at one of three positions, so no distance passes "
                       f"{dca_max_distance(dca_p['chunk_size'], dca_p['local_window'])} at any length; every key stays "
                       "attended at a distance the model knows (ChunkLlama's defaults 3/4 L0, L0/8)",
                       "An et al. 2024, Training-Free Long-Context Scaling of Large Language Models (DCA), sec. 3",
                       {"max_position": dca_max_distance(dca_p["chunk_size"], dca_p["local_window"])}),
    ]


def _field_defaults(name: str) -> dict[str, Any]:
    """A method's fixed defaults (its dataclass fields' values), shown beside the length-dependent ones."""
    cls = registry.get(name)
    skip = ("logn", "original_max_position_embeddings", "factor", "target_length", "base", "attention_factor")
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in skip and f.default is not dataclasses.MISSING and f.default is not None}


UNTUNED_LIMIT = 2.0  # factor past which frequency methods without fine-tuning degrade (YaRN sec. 4; SmolLM2 below)
MEASURED_4X = ("SmolLM2-135M (trained 8192) at 4x = 32768 tokens, perplexity past 8192 tokens (n = 1 document, "
               "_pydecimal.py; no spread): Leaky ReRoPE (window 4096, k 8) 4.64, Self-Extend about the same, the "
               "sliding-window ideal 4.67, YaRN (transformers') 5.25")
SERVING_ENGINES = {"yarn": "vLLM and llama.cpp (rope scaling type yarn)", "pi": "vLLM and llama.cpp (type linear)",
                   "dynamic_ntk": "vLLM (type dynamic)"}
REFERENCES = {
    "none": "Su et al. 2021, RoFormer",
    "finetune": "Peng et al. 2023, YaRN, sec. 4 (fine-tuned to 64k / 128k in 400-600 steps); Chen et al. 2024, LongLoRA",
    "serving": "vLLM and llama.cpp rope-scaling support; Peng et al. 2023, YaRN",
    "training_free": "Su 2023, Rectified Rotary Position Embeddings (Leaky ReRoPE); rope-ext's SmolLM2 measurement (one document; issue 13)",
    "frequency_only": "Peng et al. 2023, YaRN, sec. 3.2-3.4",
}


@dataclass(frozen=True)
class Choice:
    """The method ``choose`` picked, its parameters (as ``rope_ext.patch`` takes them), why, the rule's
    branch that decided it, the runners-up (each with why it came second) and caveats."""

    method: str
    params: dict[str, Any]
    why: str
    reference: str
    branch: str
    factor: float
    runners_up: tuple[Recommendation, ...] = ()
    caveats: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params), "why": self.why, "reference": self.reference,
                "branch": self.branch, "factor": self.factor, "runners_up": [r.to_dict() for r in self.runners_up],
                "caveats": list(self.caveats)}


def choose(target_length: int, rotary_dim: int, rope_theta: float, trained_length: int, *, finetune: bool = False,
           serving: bool = False, attention_methods: bool = True) -> Choice:
    """One method to reach ``target_length`` on a model with trained length L0, by this rule (the
    first branch that applies; s = target / L0; parameters: ``recommend``, i.e. each method's
    ``defaults_for``):

      1. s <= 1                                   -> ``none``: the target is inside the trained range.
      2. ``finetune``                             -> ``yarn`` (runner-up ``pi``): the YaRN paper fine-tunes
         it (Llama 2 to 64k in 400 steps; 10x fewer tokens than earlier methods), LongLoRA trains on
         top of a frequency method, and the result runs in serving engines as is.
      3. ``serving``                              -> ``yarn`` (runners-up ``dynamic_ntk``, ``pi``): what
         vLLM and llama.cpp implement; past s = 2 a caveat (untuned frequency methods degrade).
      4. attention-level methods run on the model -> ``leaky_rerope`` (runners-up ``self_extend``,
         ``yarn``): training-free, every distance stays inside the trained range; measured best (see
         ``MEASURED_4X``), at the cost of one extra rotation per cached key per layer and step.
      5. otherwise (e.g. Falcon: frequency methods only) -> ``yarn`` (runner-up ``pi``), with the caveat.

    ``attention_methods``: whether ``rope_ext.patch`` can apply attention-level and dynamic methods to
    this model's family. Runners-up are only methods the model can run."""
    for name, value in (("finetune", finetune), ("serving", serving), ("attention_methods", attention_methods)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    check_head_dim(rotary_dim, "rotary_dim")
    check_base(rope_theta, "rope_theta")
    s = check_length(target_length, "target_length") / check_length(trained_length, "trained_length")
    if s <= 1:
        return Choice("none", {}, f"the target ({target_length} tokens) is within the trained length ({trained_length}): "
                      "the model needs no extension", REFERENCES["none"], "within", s)
    recs = {r.method: r for r in recommend(target_length, rotary_dim, rope_theta, trained_length)}

    def second(name: str, why: str) -> Recommendation:
        return Recommendation(name, recs[name].params, why, recs[name].reference, recs[name].facts)

    untuned = (f"YaRN without fine-tuning degrades past ~{UNTUNED_LIMIT:g}x: {MEASURED_4X}; fine-tune (--finetune), "
               "or measure on your model with --tune",) if s > UNTUNED_LIMIT else ()
    pi = second("pi", "linear interpolation: what Chen et al. 2023 and LongLoRA fine-tune with, and every engine runs "
                "(type linear); the YaRN paper reports it needs more fine-tuning than YaRN for the same length")
    if finetune:
        return Choice("yarn", recs["yarn"].params,
                      f"you will fine-tune: YaRN at factor {s:g} is the method the YaRN paper fine-tunes (Llama 2 to 64k and "
                      "128k in 400 and 600 steps, 10x fewer tokens and 2.5x fewer steps than earlier methods, ahead of the "
                      "PI and NTK models it compares with); `rope-ext finetune --method yarn` trains LongLoRA on top of it, "
                      "and the fine-tuned model runs as is in "
                      f"{SERVING_ENGINES['yarn']}. {recs['yarn'].note}", REFERENCES["finetune"], "finetune", s, (pi,))
    if serving:
        dynamic = (second("dynamic_ntk", "needs no factor and leaves the model unchanged up to the trained length, but "
                          f"only {SERVING_ENGINES['dynamic_ntk']} has it, and it degrades untuned like YaRN"),) if attention_methods else ()
        return Choice("yarn", recs["yarn"].params,
                      f"it must run in a serving engine: {SERVING_ENGINES['yarn']} implement YaRN, and "
                      "`rope_ext.save_pretrained` writes it as transformers' own yarn rope_parameters, which they read; "
                      f"ReRoPE and Self-Extend are in neither. {recs['yarn'].note}", REFERENCES["serving"], "serving", s,
                      (*dynamic, pi), untuned)
    if attention_methods:
        return Choice("leaky_rerope", recs["leaky_rerope"].params,
                      "training-free and in rope-ext: Leaky ReRoPE keeps ordinary RoPE inside the window and maps every "
                      f"farther distance back inside the trained length, so the model never sees an unseen position; "
                      f"{MEASURED_4X}. Cost: one extra rotation per cached key per layer and step (keys are cached "
                      f"unrotated). {recs['leaky_rerope'].note}", REFERENCES["training_free"], "training_free", s,
                      (second("self_extend", "measured about the same as Leaky ReRoPE at 4x (Jin et al. 2024: no tuning); "
                              "floor-grouped far positions, same cost"),
                       second("yarn", f"zero overhead and runs in {SERVING_ENGINES['yarn']}, but without fine-tuning it "
                              f"degrades past ~{UNTUNED_LIMIT:g}x (5.25 against 4.64 at 4x on SmolLM2)")))
    return Choice("yarn", recs["yarn"].params,
                  "attention-level methods do not run on this model in rope-ext (its family's attention does not go "
                  "through transformers' AttentionInterface, or rope_ext.patch does not support the family), so a "
                  "frequency method it is: YaRN keeps the high frequencies, interpolates the low ones and corrects the "
                  f"attention temperature (Peng et al. 2023, sec. 3.2-3.4), and serving engines run it. {recs['yarn'].note}",
                  REFERENCES["frequency_only"], "frequency_only", s, (pi,), untuned)
