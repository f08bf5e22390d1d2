"""Closed-form limits of RoPE at a length: the critical dimension and extrapolation limit (Liu et al.
2023), the NTK base for a scale factor, and YaRN's correction range. Pure functions of numbers.

The NTK and YaRN formulas live in ``rope_ext.methods.frequency`` (what ``rope_ext.patch`` applies);
here they are only validated and called, so the calculator and the patch cannot disagree.
"""
from __future__ import annotations

import math

from ..methods.frequency import ntk_base, yarn_correction_dim, yarn_correction_range
from ..validate import number
from .bound import check_base, check_head_dim, check_length


def check_positive(value: float, name: str, minimum_exclusive: float = 0.0) -> float:
    """A finite number > ``minimum_exclusive`` (``rope_ext.validate``)."""
    return number(value, name, above=minimum_exclusive)


def critical_dimension(head_dim: int, base: float, trained_length: int) -> int:
    """Critical dimension for extrapolation (Liu et al. 2023, "Scaling Laws of RoPE-based
    Extrapolation", arXiv 2310.05209, ICLR 2024, sec. 3, "critical dimension for extrapolation"):

        d_extra = 2 * ceil(d/2 * log_base(T_train / (2 pi)))

    The dimensions i < d_extra / 2 complete a full period 2 pi / theta_i = 2 pi b^(2i/d) within the
    training length, so every angle they meet past it was seen in training; the others were not. The
    paper's example: Llama 2 (d = 128, base 10000, T_train = 4096) has d_extra = 92. Clamped to
    [0, d] (a training length shorter than 2 pi, or longer than every period)."""
    d, b, T = check_head_dim(head_dim), check_base(base), check_length(trained_length, "trained_length")
    half_dims = d / 2 * math.log(T / (2 * math.pi)) / math.log(b)
    return int(min(d, max(0, 2 * math.ceil(half_dims - 1e-9))))


def extrapolation_limit(head_dim: int, critical_dim: int, base: float) -> float:
    """Extrapolation upper bound (Liu et al. 2023, Theorem 2, the scaling law of bases larger than
    the pretraining one):

        T_extra = 2 pi * base^(d_extra / d)

    the period of the critical dimension under ``base`` (the base used at inference or in fine-tuning
    at the original length; d_extra comes from the pretraining base). Past T_extra the critical
    dimension meets angles never seen in training and attention scores go out of distribution."""
    d, b = check_head_dim(head_dim), check_base(base)
    if isinstance(critical_dim, bool) or not isinstance(critical_dim, int) or not 0 <= critical_dim <= d or critical_dim % 2:
        raise ValueError(f"critical_dim must be an even integer in 0..{d} (head_dim), got {critical_dim!r}")
    return 2 * math.pi * b ** (critical_dim / d)


def base_for_extrapolation(target_length: int, head_dim: int, critical_dim: int) -> float:
    """The smallest base whose extrapolation limit reaches ``target_length`` (Liu et al. 2023,
    Theorem 2 solved for the base): base = (T / (2 pi))^(d / d_extra). The paper writes the same with the
    unrounded critical dimension: beta = 10000^(log_{T_train/2pi}(T_extra/2pi))."""
    T, d = check_length(target_length, "target_length"), check_head_dim(head_dim)
    if isinstance(critical_dim, bool) or not isinstance(critical_dim, int) or not 0 < critical_dim <= d or critical_dim % 2:
        raise ValueError(f"critical_dim must be an even integer in 2..{d} (head_dim), got {critical_dim!r}")
    if T <= 2 * math.pi:
        raise ValueError(f"target_length must be > 2 pi (about 6 tokens), got {T}")
    return (T / (2 * math.pi)) ** (d / critical_dim)


def ntk_base_for_factor(base: float, factor: float, rotary_dim: int) -> float:
    """NTK-aware base for a scale factor s (bloc97 2023; YaRN paper, Peng et al. 2023, eq. 16):
    b' = b * s^(d / (d - 2)); ``rope_ext.methods.frequency.ntk_base`` with checked inputs."""
    b, s, d = check_base(base), check_positive(factor, "factor"), check_head_dim(rotary_dim)
    if d < 4:
        raise ValueError(f"rotary_dim must be >= 4 for the NTK base (d / (d - 2)), got {d}")
    return ntk_base(b, s, d)


def yarn_correction_dims(beta_fast: float, beta_slow: float, rotary_dim: int, base: float, trained_length: int,
                         truncate: bool = True) -> dict[str, float]:
    """YaRN's correction range (Peng et al. 2023, "YaRN", eq. 17-18 and the reference code): the
    dimension-pair index i whose wavelength 2 pi b^(2i/d) fits r times in L0 is

        i(r) = d * ln(L0 / (2 pi r)) / (2 ln b);

    pairs below i(beta_fast) are extrapolated (kept), pairs above i(beta_slow) interpolated (divided
    by s), and a linear ramp blends between. ``low``/``high`` are what ``rope_ext.patch`` uses
    (floored / ceiled when ``truncate``, clamped to [0, d - 1] as in the reference code); the raw
    values are returned alongside."""
    slow = check_positive(beta_slow, "beta_slow")
    fast = check_positive(beta_fast, "beta_fast", slow)
    d, b, L0 = check_head_dim(rotary_dim), check_base(base), check_length(trained_length, "trained_length")
    low, high = yarn_correction_range(fast, slow, d, b, L0, truncate)
    return {"low": low, "high": high, "low_raw": yarn_correction_dim(fast, d, b, L0),
            "high_raw": yarn_correction_dim(slow, d, b, L0), "pairs": d // 2}
