"""Intervals: Wilson against its closed formula and textbook values; the document bootstrap against
its defining properties (contains the estimate, shrinks with n, deterministic, degenerate for identical
documents, paired for ratios)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rope_ext.eval.stats import (
    Interval,
    bootstrap_mean,
    bootstrap_ppl,
    bootstrap_ratio,
    pooled_ppl,
    separated,
    wilson,
)

Z = 1.959963984540054


def wilson_reference(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): the p solving |k/n - p| = z sqrt(p(1-p)/n), i.e. the roots of
    (1 + z^2/n) p^2 - (2k/n + z^2/n) p + (k/n)^2 = 0."""
    a, b, c = 1 + Z * Z / n, -(2 * k / n + Z * Z / n), (k / n) ** 2
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (5, 10), (1, 3), (17, 50), (99, 100), (1, 1)])
def test_wilson_equals_the_roots_of_its_quadratic(k, n):
    iv = wilson(k, n)
    low, high = wilson_reference(k, n)
    assert iv.point == k / n and iv.n == n
    assert iv.low == pytest.approx(max(0.0, low), abs=1e-12) and iv.high == pytest.approx(min(1.0, high), abs=1e-12)


@pytest.mark.parametrize("k,n,low,high", [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634)])
def test_wilson_textbook_values(k, n, low, high):
    iv = wilson(k, n)
    assert (round(iv.low, 4), round(iv.high, 4)) == (low, high)


def test_wilson_refuses_impossible_counts():
    for k, n, match in ((3, 0, "trials must be an integer >= 1, got 0"), (11, 10, r"successes must be an integer in \[0, trials=10\], got 11"),
                        (-1, 10, "got -1"), (2.5, 10, "got 2.5")):
        with pytest.raises(ValueError, match=match):
            wilson(k, n)


def documents(rng: np.random.Generator, n: int) -> tuple[list[float], list[int]]:
    tokens = rng.integers(50, 200, size=n)
    return list(tokens * rng.normal(2.0, 0.3, size=n)), [int(t) for t in tokens]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 8.0), st.integers(1, 500)), min_size=2, max_size=12))
def test_bootstrap_interval_contains_the_pooled_ppl(docs):
    sums = [mean * n for mean, n in docs]
    tokens = [n for _, n in docs]
    iv = bootstrap_ppl(sums, tokens, draws=500)
    direct = math.exp(sum(sums) / sum(tokens))
    assert iv.point == pytest.approx(direct, rel=1e-12) and iv.n == len(docs)
    assert iv.low <= iv.point * (1 + 1e-12) and iv.point <= iv.high * (1 + 1e-12)


def test_bootstrap_shrinks_with_more_documents_and_is_deterministic():
    rng = np.random.default_rng(0)
    widths = []
    for n in (5, 50, 500):
        iv = bootstrap_ppl(*documents(rng, n))
        widths.append(math.log(iv.high / iv.low))
    assert widths[0] > widths[1] > widths[2] and widths[0] > 4 * widths[2]  # ~ 1 / sqrt(n)
    sums, tokens = documents(np.random.default_rng(1), 20)
    assert bootstrap_ppl(sums, tokens) == bootstrap_ppl(sums, tokens)
    assert bootstrap_ppl(sums, tokens, seed=1) != bootstrap_ppl(sums, tokens)


def test_identical_documents_give_a_point_interval():
    iv = bootstrap_ppl([123.4] * 6, [60] * 6)
    for value in (iv.low, iv.high):
        assert value == pytest.approx(math.exp(123.4 / 60), rel=1e-12)


def test_ratio_is_paired_by_document():
    """b = a plus 0.1 nats on every token of every document: each paired draw has ratio exp(-0.1)
    exactly, whatever the spread between documents; the unpaired intervals of a and b overlap."""
    sums, tokens = documents(np.random.default_rng(2), 8)
    shifted = [s + 0.1 * n for s, n in zip(sums, tokens)]
    iv = bootstrap_ratio(sums, tokens, shifted, tokens)
    for value in (iv.point, iv.low, iv.high):
        assert value == pytest.approx(math.exp(-0.1), rel=1e-9)
    assert not separated(bootstrap_ppl(sums, tokens), bootstrap_ppl(shifted, tokens))
    assert iv.excludes(1.0) and not iv.excludes(math.exp(-0.1))


def test_pooled_ppl_weights_tokens():
    assert pooled_ppl([10.0, 30.0], [10, 10]) == pytest.approx(math.exp(2.0))
    assert pooled_ppl([10.0, 90.0], [10, 30]) == pytest.approx(math.exp(100 / 40))


def test_bootstrap_mean():
    values = [0.0, 0.2, 0.4, 1.0, 1.0, 0.6]
    iv = bootstrap_mean(values)
    assert iv.point == pytest.approx(np.mean(values)) and iv.low < iv.point < iv.high
    assert bootstrap_mean([0.4] * 5).low == pytest.approx(0.4)


def test_separated():
    a = Interval(1.0, 0.9, 1.1, 10)
    assert separated(a, Interval(1.5, 1.2, 1.8, 10)) and separated(Interval(0.5, 0.4, 0.6, 10), a)
    assert not separated(a, Interval(1.15, 1.05, 1.3, 10)) and not separated(a, a)


def test_bad_bootstrap_input():
    with pytest.raises(ValueError, match="needs at least 2 documents"):
        bootstrap_ppl([1.0], [10])
    with pytest.raises(ValueError, match=r"must be 1-D and of one length, got shapes \(2,\) and \(3,\)"):
        bootstrap_ppl([1.0, 2.0], [1, 2, 3])
    with pytest.raises(ValueError, match="token count > 0"):
        bootstrap_ppl([1.0, 2.0], [1, 0])
    with pytest.raises(ValueError, match="same documents, got 2 and 3"):
        bootstrap_ratio([1.0, 2.0], [1, 1], [1.0, 2.0, 3.0], [1, 1, 1])
    with pytest.raises(ValueError, match="draws must be an integer >= 100, got 5"):
        bootstrap_ppl([1.0, 2.0], [1, 1], draws=5)
