"""Spread of evaluation figures: 95% intervals for perplexities (bootstrap over documents) and for
accuracies (Wilson score interval). Pure numpy; every function is deterministic.

A token-weighted PPL over documents i with NLL sums s_i and token counts n_i is exp(sum s_i / sum n_i).
Its percentile bootstrap (Efron & Tibshirani 1993, ch. 13) resamples whole documents with replacement
(documents, not tokens: tokens of one document are not independent) and takes the 2.5% and 97.5%
quantiles of the resampled PPLs. A ratio of two methods run on the same documents is bootstrapped
paired: each draw takes the same documents for both.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DRAWS = 10_000
SEED = 0
Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass(frozen=True)
class Interval:
    """A point estimate, its 95% interval [low, high] and the n (documents, trials) it rests on."""

    point: float
    low: float
    high: float
    n: int

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


def separated(a: Interval, b: Interval) -> bool:
    """True when the two intervals do not overlap (one lies wholly above the other)."""
    return a.high < b.low or b.high < a.low


def _arrays(nll_sums: Sequence[float], tokens: Sequence[int], what: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(nll_sums, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    if s.ndim != 1 or s.shape != n.shape:
        raise ValueError(f"{what}: nll_sums and tokens must be 1-D and of one length, got shapes {s.shape} and {n.shape}")
    if s.size < 2:
        raise ValueError(f"{what}: a bootstrap needs at least 2 documents (units), got {s.size}")
    if np.any(n <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: every value must be finite and every token count > 0, got values {s.tolist()}, "
                         f"tokens {n.tolist()}")
    return s, n


def _draws(size: int, draws: int, seed: int) -> np.ndarray:
    if not isinstance(draws, int) or draws < 100:
        raise ValueError(f"draws must be an integer >= 100, got {draws!r}")
    return np.random.default_rng(seed).integers(0, size, size=(draws, size))


def pooled_ppl(nll_sums: Sequence[float], tokens: Sequence[int]) -> float:
    """exp(sum of NLL sums / sum of tokens): the PPL over every token of every document."""
    return math.exp(math.fsum(nll_sums) / sum(tokens))


def bootstrap_ppl(nll_sums: Sequence[float], tokens: Sequence[int], draws: int = DRAWS, seed: int = SEED) -> Interval:
    """Percentile bootstrap 95% interval of the token-weighted PPL, resampling documents."""
    s, n = _arrays(nll_sums, tokens, "bootstrap_ppl")
    idx = _draws(s.size, draws, seed)
    boot = np.exp(s[idx].sum(axis=1) / n[idx].sum(axis=1))
    low, high = np.quantile(boot, [0.025, 0.975])
    return Interval(pooled_ppl(nll_sums, tokens), float(low), float(high), int(s.size))


def bootstrap_ratio(nll_sums_a: Sequence[float], tokens_a: Sequence[int], nll_sums_b: Sequence[float],
                    tokens_b: Sequence[int], draws: int = DRAWS, seed: int = SEED) -> Interval:
    """Percentile bootstrap 95% interval of PPL(a) / PPL(b), paired: document i of a and of b are the
    same text, and each draw resamples the same documents for both."""
    sa, na = _arrays(nll_sums_a, tokens_a, "bootstrap_ratio (a)")
    sb, nb = _arrays(nll_sums_b, tokens_b, "bootstrap_ratio (b)")
    if sa.size != sb.size:
        raise ValueError(f"bootstrap_ratio: a and b must cover the same documents, got {sa.size} and {sb.size}")
    idx = _draws(sa.size, draws, seed)
    boot = np.exp(sa[idx].sum(axis=1) / na[idx].sum(axis=1) - sb[idx].sum(axis=1) / nb[idx].sum(axis=1))
    low, high = np.quantile(boot, [0.025, 0.975])
    point = pooled_ppl(nll_sums_a, tokens_a) / pooled_ppl(nll_sums_b, tokens_b)
    return Interval(point, float(low), float(high), int(sa.size))


def bootstrap_mean(values: Sequence[float], draws: int = DRAWS, seed: int = SEED) -> Interval:
    """Percentile bootstrap 95% interval of a mean over independent units (e.g. per-trial digit accuracy)."""
    v, _ = _arrays(values, [1] * len(values), "bootstrap_mean")
    boot = v[_draws(v.size, draws, seed)].mean(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return Interval(float(v.mean()), float(low), float(high), int(v.size))


def wilson(successes: int, trials: int, z: float = Z95) -> Interval:
    """Wilson score interval of a proportion (Wilson 1927; Agresti & Coull 1998):
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = successes / n."""
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"wilson: trials must be an integer >= 1, got {trials!r}")
    if not isinstance(successes, int) or not 0 <= successes <= trials:
        raise ValueError(f"wilson: successes must be an integer in [0, trials={trials}], got {successes!r}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (rounding aside)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(p, low, high, trials)
