"""The calculator's formulas: the base lower bound scan (Men et al. 2024) against a brute-force
direct sum and the published table, and the critical dimension / extrapolation limit (Liu et al.
2023), NTK base and YaRN correction range against their defining properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rope_ext import calc
from rope_ext.calc.bound import base_grid

BRUTE_MAX_L = 512
BRUTE_DIMS = (4, 8, 16)
GRID = dict(min_base=2.0, max_base=1e5, per_decade=40)


def brute_first_negative(bases: np.ndarray, d: int, max_m: int, tol: float) -> np.ndarray:
    """First m in 0..max_m with sum_i cos(m b^(-2i/d)) < -tol, by the direct sum over every m."""
    m = np.arange(max_m + 1, dtype=np.float64)
    out = np.full(bases.size, max_m + 1)
    for j, b in enumerate(bases):
        theta = b ** (-2.0 * np.arange(d // 2) / d)
        B = np.cos(m[:, None] * theta[None, :]).sum(axis=1)
        neg = np.flatnonzero(B < -tol)
        if neg.size:
            out[j] = neg[0]
    return out


@pytest.fixture(scope="module")
def brute():
    bases = base_grid(GRID["min_base"], GRID["max_base"], GRID["per_decade"])
    return bases, {d: (brute_first_negative(bases, d, BRUTE_MAX_L, 1e-9), brute_first_negative(bases, d, BRUTE_MAX_L, -1e-9))
                   for d in BRUTE_DIMS}


@pytest.mark.parametrize("d", BRUTE_DIMS)
def test_scan_matches_brute_force_direct_sum(d, brute):
    bases, table = brute
    strict, loose = table[d]
    scan = calc.scan_bases(BRUTE_MAX_L, d, **GRID)
    np.testing.assert_array_equal(scan.bases, bases)
    clear = strict == loose                                 # no B within 1e-9 of 0 decides these
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(scan.first_negative[clear], strict[clear])
    for L in (16, 64, 200, BRUTE_MAX_L):
        ok = strict > L
        bound = scan.bound(L)
        if clear.all():
            assert bound.first_feasible == (float(bases[np.argmax(ok)]) if ok.any() else None)


def test_non_monotonic_feasibility_is_found_and_reported(brute):
    """Find by brute force a (d, L) where a feasible base lies below an infeasible one; the scan must
    report first_feasible < stable and the same feasible islands."""
    bases, table = brute
    found = []
    for d in BRUTE_DIMS:
        first_neg = table[d][0]
        for L in range(8, BRUTE_MAX_L + 1, 8):
            ok = first_neg > L
            if ok.any() and not ok[np.argmax(ok):].all():
                found.append((d, L, ok))
    assert found, "no non-monotonic case on the brute-force grid"
    for d, L, ok in found[:5]:
        bound = calc.scan_bases(BRUTE_MAX_L, d, **GRID).bound(L)
        last_bad = np.flatnonzero(~ok)[-1]
        assert bound.first_feasible == pytest.approx(bases[np.argmax(ok)])
        assert bound.first_feasible < bound.stable == pytest.approx(bases[last_bad + 1])
        runs, k = [], 0
        while k <= last_bad:
            if ok[k]:
                end = k
                while ok[end + 1]:
                    end += 1
                runs.append((bases[k], bases[end]))
                k = end + 1
            else:
                k += 1
        assert bound.feasible_islands == [pytest.approx(r) for r in runs]


@pytest.mark.slow
def test_base_bound_d128_lands_on_published_order():
    b4k, b32k = calc.base_lower_bounds([4096, 32768], 128, per_decade=100)
    assert 1e4 < b4k.first_feasible < 1e5                  # "a few times 1e4"
    assert b4k.first_feasible == pytest.approx(calc.PUBLISHED_BOUNDS_D128[4096], rel=0.25)
    assert 0.5 < b32k.first_feasible / calc.PUBLISHED_BOUNDS_D128[32768] < 2   # about 6e5
    assert b32k.first_feasible == pytest.approx(calc.SU_BOUNDS_D128[32768], rel=0.01)  # the island refine finds
    coarse = calc.base_lower_bounds([32768], 128, refine=False, per_decade=100)[0]
    assert coarse.first_feasible > 1.4 * b32k.first_feasible   # the 100-per-decade grid alone steps over it
    for bound in (b4k, b32k):
        assert bound.first_feasible <= bound.stable <= bound.certified_above
        ms = np.arange(bound.length + 1)
        assert calc.similarity_margin(bound.first_feasible, 128, torch.as_tensor(ms)).min() >= 0


def test_su_island_at_32k_is_found_by_a_dense_scan():
    """At L = 32k the feasible bases below the stable one are islands about 0.15 % wide: Su's 6.3e5
    is one (6.4e5 just above it is infeasible); a dense scan of that stretch finds its left edge."""
    m = torch.arange(32769)
    assert calc.similarity_margin(6.4e5, 128, m).min() < 0
    bound = calc.scan_bases(32768, 128, min_base=6.25e5, max_base=6.35e5, per_decade=3000).bound(32768)
    assert bound.first_feasible == pytest.approx(calc.SU_BOUNDS_D128[32768], rel=0.005)
    assert calc.similarity_margin(bound.first_feasible, 128, m).min() >= 0


def test_critical_dimension_llama2_is_92():
    """Liu et al. 2023: Llama 2 (d 128, base 10000, trained 4096) has critical dimension 92."""
    assert calc.critical_dimension(128, 10000.0, 4096) == 92
    assert calc.extrapolation_limit(128, 92, 10000.0) == pytest.approx(2 * math.pi * 10000 ** (92 / 128))


@settings(max_examples=200, deadline=None)
@given(half=st.integers(2, 128), log_base=st.floats(2.0, 8.0), trained=st.integers(8, 1 << 20))
def test_critical_dimension_splits_periods_at_the_trained_length(half, log_base, trained):
    """Pairs below d_extra/2 complete a period 2 pi b^(2i/d) within T_train; the others do not."""
    d, b = 2 * half, 10.0 ** log_base
    d_extra = calc.critical_dimension(d, b, trained)
    periods = 2 * math.pi * b ** (2 * np.arange(half) / d)
    assert np.all(periods[: d_extra // 2] <= trained * (1 + 1e-9))
    assert np.all(periods[d_extra // 2:] > trained * (1 - 1e-9))
    if d_extra < d:
        assert calc.extrapolation_limit(d, d_extra, b) >= trained * (1 - 1e-9)
        target = 4 * trained
        if d_extra:
            assert calc.extrapolation_limit(d, d_extra, calc.base_for_extrapolation(target, d, d_extra)) == pytest.approx(target)


@settings(max_examples=50, deadline=None)
@given(half=st.integers(2, 128), s=st.floats(1.0, 64.0), log_base=st.floats(3.0, 7.0))
def test_ntk_base_keeps_highest_and_divides_lowest_frequency(half, s, log_base):
    d, b = 2 * half, 10.0 ** log_base
    nb = calc.ntk_base_for_factor(b, s, d)
    assert nb ** (-(d - 2) / d) == pytest.approx(b ** (-(d - 2) / d) / s, rel=1e-9)


def test_yarn_correction_dims_are_where_wavelengths_fit_beta_times():
    d, b, L0 = 128, 10000.0, 4096
    r = calc.yarn_correction_dims(32.0, 1.0, d, b, L0)
    for beta, i in ((32.0, r["low_raw"]), (1.0, r["high_raw"])):
        assert 2 * math.pi * b ** (2 * i / d) == pytest.approx(L0 / beta)
    assert (r["low"], r["high"]) == (math.floor(r["low_raw"]), math.ceil(r["high_raw"]))


@pytest.mark.parametrize("call, text", [
    (lambda: calc.critical_dimension(127, 1e4, 4096), r"head_dim must be a positive even integer .*got 127"),
    (lambda: calc.critical_dimension(128, 1e4, 0), "trained_length must be at least 1 token, got 0"),
    (lambda: calc.critical_dimension(128, 1.0, 4096), r"^base must be > 1, got 1$"),
    (lambda: calc.extrapolation_limit(128, 91, 1e4), r"critical_dim must be an even integer in 0\.\.128 \(head_dim\), got 91"),
    (lambda: calc.ntk_base_for_factor(1e4, -2.0, 128), r"factor must be > 0, got -2$"),
    (lambda: calc.yarn_correction_dims(1.0, 32.0, 128, 1e4, 4096), r"beta_fast must be > 32, got 1$"),
    (lambda: calc.base_lower_bound(0, 128), "^length must be at least 1 token, got 0"),
])
def test_bad_input_names_the_value(call, text):
    with pytest.raises(ValueError, match=text):
        call()
