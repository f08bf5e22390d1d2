"""Frequency methods: they change theta_i (and the cos/sin magnitude), not the attention scores.

Formulas are pure functions named as in their papers; each Method dataclass only validates its
parameters and calls them. ``s`` is the scale factor L'/L, ``d`` the rotary dimension, ``b`` the
RoPE base, ``L0`` the trained length (``original_max_position_embeddings``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..validate import MAX_BASE
from .base import Method, RopeSpec, check_bool, check_int, check_number, rope_inv_freq
from .registry import register

MAX_FACTOR = 4096.0  # scale factors in use reach 512 (LongRoPE, 4k -> 2M); more is a typo
MIN_BETA = 1e-3  # YaRN beta_slow (rotations of a dimension in L0): its correction dimension is finite above it
MAX_ATTENTION_FACTOR = 4.0  # YaRN's 0.1 ln s + 1 is 1.83 at s = 4096; 1e6 made every fp16 logit non-finite


def pi_inv_freq(inv_freq: torch.Tensor, s: float) -> torch.Tensor:
    """Position Interpolation (Chen et al. 2023, eq. 4): f'(x, m) = f(x, m/s), i.e. theta_i' = theta_i / s."""
    return inv_freq / s


def ntk_base(b: float, s: float, d: int) -> float:
    """NTK-aware base change (bloc97 2023; YaRN paper eq. 16): b' = b * s^(d / (d - 2)); d >= 4."""
    _check_ntk_dim(d)
    return b * s ** (d / (d - 2))


def _check_ntk_dim(d: int) -> None:
    if d < 4:
        raise ValueError(f"NTK scaling needs a rotary dimension d >= 4 (its exponent is d / (d - 2)), got d = {d}")


def dynamic_ntk_base(b: float, s: float, seq_len: int, L0: int, d: int) -> float:
    """Dynamic NTK (emozilla 2023; YaRN paper sec. 3.3, transformers' form):
    b' = b * (s * L / L0 - (s - 1))^(d / (d - 2)) for the current length L > L0, else b."""
    _check_ntk_dim(d)
    L = max(seq_len, L0)
    return b * ((s * L / L0) - (s - 1)) ** (d / (d - 2))


def ntk_by_parts_ramp(r: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """NTK-by-parts ramp gamma(r) (YaRN paper eq. 18): 0 if r < alpha, 1 if r > beta, linear between;
    r(d) = L0 / lambda_d is how many wavelengths fit in the trained length."""
    return torch.clamp((r - alpha) / (beta - alpha), 0.0, 1.0)


def ntk_by_parts_inv_freq(inv_freq: torch.Tensor, s: float, L0: int, alpha: float, beta: float) -> torch.Tensor:
    """NTK-by-parts (bloc97 2023; YaRN paper eq. 19): h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d."""
    if s == 1:
        return inv_freq.clone()
    r = L0 * inv_freq / (2 * math.pi)
    gamma = ntk_by_parts_ramp(r, alpha, beta)
    return (1 - gamma) * inv_freq / s + gamma * inv_freq


def yarn_correction_dim(num_rotations: float, d: int, b: float, L0: int) -> float:
    """The dimension whose wavelength fits ``num_rotations`` times in L0 (YaRN, eq. 17 inverted):
    d * ln(L0 / (2 pi r)) / (2 ln b)."""
    return (d * math.log(L0 / (num_rotations * 2 * math.pi))) / (2 * math.log(b))


def yarn_correction_range(beta_fast: float, beta_slow: float, d: int, b: float, L0: int, truncate: bool = True) -> tuple[float, float]:
    """Dimensions [low, high] between which YaRN blends interpolation and extrapolation."""
    low = yarn_correction_dim(beta_fast, d, b, L0)
    high = yarn_correction_dim(beta_slow, d, b, L0)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """Linear ramp over dimension pairs 0..n-1: 0 below ``low``, 1 above ``high`` (YaRN eq. 18 in dims)."""
    if low == high:
        high += 0.001
    return torch.clamp((torch.arange(n, dtype=torch.float32) - low) / (high - low), 0, 1)


def yarn_mscale(s: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature (eq. 22): sqrt(1/t) = 0.1 ln(s) + 1, applied to cos and sin."""
    return 1.0 if s <= 1 else 0.1 * mscale * math.log(s) + 1.0


def yarn_inv_freq(b: float, d: int, s: float, L0: int, beta_fast: float, beta_slow: float, truncate: bool = True) -> torch.Tensor:
    """YaRN frequencies (Peng et al. 2023, eq. 19 with the dimension ramp of the reference code)."""
    pos_freqs = b ** (torch.arange(0, d, 2).to(dtype=torch.float) / d)
    if s == 1:
        return 1.0 / pos_freqs
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
    low, high = yarn_correction_range(beta_fast, beta_slow, d, b, L0, truncate)
    keep = 1 - yarn_ramp(low, high, d // 2)
    return interpolation * (1 - keep) + extrapolation * keep


def llama3_inv_freq(inv_freq: torch.Tensor, s: float, L0: int, low_freq_factor: float, high_freq_factor: float) -> torch.Tensor:
    """Llama 3.1 frequency scaling (Meta 2024): keep wavelengths < L0/high_freq_factor, divide those
    > L0/low_freq_factor by s, and blend smoothly in between."""
    if s == 1:
        return inv_freq.clone()
    low_freq_wavelen = L0 / low_freq_factor
    high_freq_wavelen = L0 / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s, inv_freq)
    smooth = (L0 / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / s + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True, kw_only=True)
class ScaledMethod(Method):
    """A frequency method with a scale factor s = target_length / trained_length."""

    min_factor: ClassVar[float] = 1.0
    dynamic: ClassVar[bool] = False
    factor: float | None = None
    target_length: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor is not None:
            check_number(self, "factor", above=0.0, at_most=MAX_FACTOR)
            if self.factor < self.min_factor:
                raise ValueError(f"{self.name}: factor must be >= {self.min_factor}, got {self.factor}")
        if self.target_length is not None:
            check_int(self, "target_length", minimum=1)

    def bind(self, spec: RopeSpec) -> ScaledMethod:
        bound = super().bind(spec)
        factor, target = self.factor, self.target_length
        if factor is None and target is None:
            raise ValueError(f"{self.name}: give factor (a scale, e.g. 8) or target_length (tokens); neither was given")
        derived = target / bound.trained_length if target is not None else None
        if factor is None:
            if derived < self.min_factor:
                raise ValueError(f"{self.name}: target_length={target} is below what it can scale to: trained length "
                                 f"{bound.trained_length} x factor >= {self.min_factor:g}; give target_length >= "
                                 f"{math.ceil(bound.trained_length * self.min_factor)} (or no method inside the trained length)")
            factor = derived
        elif derived is not None and not math.isclose(factor, derived, rel_tol=1e-6):
            raise ValueError(
                f"{self.name}: factor={factor} and target_length={target} disagree (trained length "
                f"{bound.trained_length} gives factor {derived:g}); give one of them"
            )
        return dataclasses.replace(bound, factor=float(factor))

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """Scale s = max(1, length / L0) unless a factor, target length or base is given; dynamic
        methods scale from the current length and keep their factor 1."""
        params = super().defaults_for(spec, length, **given)
        if not cls.dynamic and not {"factor", "target_length", "base"} & set(params):
            params["factor"] = max(1.0, length / (params.get("original_max_position_embeddings") or spec.trained_length))
        return params

    @property
    def reach(self) -> int | None:
        """The target length (trained length x s); None for dynamic methods (they scale with the
        length) and an explicit base."""
        if self.dynamic or self.factor is None:
            return None
        return self.target_length or round(self.trained_length * self.s)

    @property
    def context_length(self) -> int | None:
        return self.reach

    @property
    def s(self) -> float:
        if self.factor is None:
            raise ValueError(f"{self.name}: factor is not resolved; bind() the method first")
        return self.factor


@register("pi")
@dataclass(frozen=True, kw_only=True)
class PositionInterpolation(ScaledMethod):
    summary: ClassVar[str] = "Position Interpolation: positions divided by the factor (linear scaling)"
    reference: ClassVar[str] = "Chen et al. 2023, Extending Context Window of LLMs via Positional Interpolation"

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        return pi_inv_freq(rope_inv_freq(spec.rope_theta, spec.rotary_dim), self.s), 1.0

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any]:
        return {"rope_type": "linear", "rope_theta": spec.rope_theta, "factor": self.s}


@register("ntk")
@dataclass(frozen=True, kw_only=True)
class NTKAware(ScaledMethod):
    summary: ClassVar[str] = "NTK-aware / beta-base scaling: base * s^(d/(d-2)), or an explicit base"
    reference: ClassVar[str] = "bloc97 2023 (NTK-aware scaled RoPE); Peng et al. 2023 (YaRN) eq. 16"
    min_factor: ClassVar[float] = 1 / MAX_FACTOR
    base: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base is not None:
            check_number(self, "base", above=1.0, at_most=MAX_BASE)
            if self.factor is not None or self.target_length is not None:
                raise ValueError("ntk: give either base or factor/target_length, not both")

    def bind(self, spec: RopeSpec) -> NTKAware:
        bound = Method.bind(self, spec) if self.base is not None else super().bind(spec)
        if not 1 < bound.new_base(spec) <= MAX_BASE:
            raise ValueError(f"ntk: factor={bound.factor:g} turns the base {spec.rope_theta:g} into {bound.new_base(spec):g}; "
                             f"the base must stay in (1, {MAX_BASE:g}]: give a factor closer to 1")
        return bound

    def new_base(self, spec: RopeSpec) -> float:
        return self.base if self.base is not None else ntk_base(spec.rope_theta, self.s, spec.rotary_dim)

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        return rope_inv_freq(self.new_base(spec), spec.rotary_dim), 1.0

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self.new_base(spec)}


@register("dynamic_ntk")
@dataclass(frozen=True, kw_only=True)
class DynamicNTK(ScaledMethod):
    summary: ClassVar[str] = "Dynamic NTK: the NTK base grows with the current length; exact with the KV cache"
    reference: ClassVar[str] = "emozilla 2023 (Dynamically scaled RoPE); Peng et al. 2023 (YaRN) sec. 3.3"
    rotation: ClassVar[str] = "deferred"
    min_factor: ClassVar[float] = 1 / MAX_FACTOR
    dynamic: ClassVar[bool] = True
    factor: float | None = 1.0

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        base = dynamic_ntk_base(spec.rope_theta, self.s, seq_len or self.trained_length, self.trained_length, spec.rotary_dim)
        return rope_inv_freq(base, spec.rotary_dim), 1.0

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any]:
        """transformers' "dynamic" (its L0 is max_position_embeddings, which rope_ext keeps as the
        trained length); note transformers caches keys rotated with older bases, rope_ext.load does not."""
        return {"rope_type": "dynamic", "rope_theta": spec.rope_theta, "factor": self.s}


@register("ntk_by_parts")
@dataclass(frozen=True, kw_only=True)
class NTKByParts(ScaledMethod):
    summary: ClassVar[str] = "NTK-by-parts: interpolate long wavelengths, keep short ones, ramp between"
    reference: ClassVar[str] = "bloc97 2023; Peng et al. 2023 (YaRN) eq. 17-19"
    alpha: float = 1.0
    beta: float = 32.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "alpha", at_least=0.0)
        check_number(self, "beta", above_field="alpha")

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        inv = rope_inv_freq(spec.rope_theta, spec.rotary_dim)
        return ntk_by_parts_inv_freq(inv, self.s, self.trained_length, self.alpha, self.beta), 1.0


@dataclass(frozen=True, kw_only=True)
class YaRNParams(ScaledMethod):
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "beta_slow", at_least=MIN_BETA)
        check_number(self, "beta_fast", above_field="beta_slow")
        check_bool(self, "truncate")
        if self.attention_factor is not None:
            check_number(self, "attention_factor", above=0.0, at_most=MAX_ATTENTION_FACTOR)

    def yarn(self, spec: RopeSpec, s: float) -> tuple[torch.Tensor, float]:
        inv = yarn_inv_freq(spec.rope_theta, spec.rotary_dim, s, self.trained_length, self.beta_fast, self.beta_slow, self.truncate)
        return inv, self.attention_factor if self.attention_factor is not None else yarn_mscale(s)


@register("yarn")
@dataclass(frozen=True, kw_only=True)
class YaRN(YaRNParams):
    summary: ClassVar[str] = "YaRN: NTK-by-parts frequencies plus attention temperature 0.1 ln(s) + 1"
    reference: ClassVar[str] = "Peng et al. 2023, YaRN: Efficient Context Window Extension of LLMs"

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        return self.yarn(spec, self.s)

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any]:
        params = {
            "rope_type": "yarn", "rope_theta": spec.rope_theta, "factor": self.s,
            "original_max_position_embeddings": self.trained_length,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "truncate": self.truncate,
        }
        if self.attention_factor is not None:
            params["attention_factor"] = self.attention_factor
        return params


@register("dynamic_yarn")
@dataclass(frozen=True, kw_only=True)
class DynamicYaRN(YaRNParams):
    summary: ClassVar[str] = "Dynamic YaRN: YaRN with s = max(1, L / L0) at the current length L"
    reference: ClassVar[str] = "Peng et al. 2023 (YaRN) sec. 3.3"
    rotation: ClassVar[str] = "deferred"
    dynamic: ClassVar[bool] = True
    factor: float | None = 1.0

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        s = max(1.0, self.s * (seq_len or self.trained_length) / self.trained_length)
        return self.yarn(spec, s)


@register("llama3")
@dataclass(frozen=True, kw_only=True)
class Llama3(ScaledMethod):
    summary: ClassVar[str] = "Llama 3.1 scaling: by-parts interpolation with low/high frequency factors"
    reference: ClassVar[str] = "Meta 2024, The Llama 3 Herd of Models (rope scaling of Llama 3.1)"
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "low_freq_factor", above=0.0)
        check_number(self, "high_freq_factor", above_field="low_freq_factor")

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        inv = rope_inv_freq(spec.rope_theta, spec.rotary_dim)
        return llama3_inv_freq(inv, self.s, self.trained_length, self.low_freq_factor, self.high_freq_factor), 1.0

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any]:
        return {
            "rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": self.s,
            "original_max_position_embeddings": self.trained_length,
            "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
        }


@register("none")
@dataclass(frozen=True, kw_only=True)
class PlainRoPE(Method):
    summary: ClassVar[str] = "Plain RoPE, unchanged (the baseline; useful with logn=True)"
    reference: ClassVar[str] = "Su et al. 2021, RoFormer"
