"""Properties of the frequency formulas, against plain RoPE and their papers' definitions."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rope_ext.methods import REGISTRY
from rope_ext.methods.base import RopeSpec, rope_inv_freq
from rope_ext.methods.frequency import (
    llama3_inv_freq,
    ntk_base,
    ntk_by_parts_inv_freq,
    yarn_correction_range,
    yarn_inv_freq,
    yarn_mscale,
    yarn_ramp,
)
from rope_ext.rotary import cos_sin

dims = st.sampled_from([16, 32, 64, 128])
scales = st.floats(min_value=1.0, max_value=64.0)
bases = st.sampled_from([1e4, 5e5, 1e6])


def spec(d=64, base=1e4, L0=128):
    return RopeSpec(rope_theta=base, rotary_dim=d, trained_length=L0, head_dim=d, num_heads=4)


@settings(max_examples=40, deadline=None)
@given(d=dims, s=scales, base=bases, p=st.integers(0, 50_000))
def test_pi_at_p_equals_rope_at_p_over_s(d, s, base, p):
    """The rotation angle of PI at position p is RoPE's angle at p / s (float32 frequencies)."""
    m = REGISTRY["pi"](factor=s).bind(spec(d, base))
    inv, scale = m.frequencies(spec(d, base))
    plain = rope_inv_freq(base, d).double()
    assert scale == 1.0
    assert torch.allclose(p * inv.double(), (p / s) * plain, rtol=1e-6, atol=1e-9)
    cos_pi, _ = cos_sin(inv, torch.tensor([[min(p, 2000)]]), scale, torch.float32)
    cos_rope, _ = cos_sin(plain.float(), torch.tensor([[min(p, 2000) / s]]), 1.0, torch.float32)
    assert torch.allclose(cos_pi, cos_rope, atol=2e-3)


@settings(max_examples=40, deadline=None)
@given(d=dims, s=scales, base=bases)
def test_ntk_keeps_highest_and_divides_lowest_by_s(d, s, base):
    inv, _ = REGISTRY["ntk"](factor=s).bind(spec(d, base)).frequencies(spec(d, base))
    plain = rope_inv_freq(base, d)
    assert inv[0] == plain[0] == 1.0
    assert math.isclose(inv[-1].item(), plain[-1].item() / s, rel_tol=1e-4)
    assert math.isclose(ntk_base(base, s, d), base * s ** (d / (d - 2)))


def test_ntk_explicit_base():
    inv, _ = REGISTRY["ntk"](base=5e5).bind(spec()).frequencies(spec())
    assert torch.equal(inv, rope_inv_freq(5e5, 64))


@settings(max_examples=40, deadline=None)
@given(d=dims, s=st.floats(1.5, 64.0), base=bases, L0=st.sampled_from([128, 2048, 4096]))
def test_yarn_ramp_is_0_or_1_outside_correction_range(d, s, base, L0):
    low, high = yarn_correction_range(32, 1, d, base, L0)
    ramp = yarn_ramp(low, high, d // 2)
    idx = torch.arange(d // 2)
    assert torch.all(ramp[idx <= low] == 0) and torch.all(ramp[idx >= high] == 1)
    inv = yarn_inv_freq(base, d, s, L0, 32, 1)
    plain = rope_inv_freq(base, d)
    assert torch.allclose(inv[idx <= low], plain[idx <= low])            # extrapolated: unchanged
    assert torch.allclose(inv[idx >= high], plain[idx >= high] / s)      # interpolated: PI


def test_yarn_mscale_matches_paper():
    assert yarn_mscale(1.0) == 1.0
    assert math.isclose(yarn_mscale(16.0), 0.1 * math.log(16.0) + 1)
    _, scale = REGISTRY["yarn"](factor=16.0).bind(spec()).frequencies(spec())
    assert math.isclose(scale, 0.1 * math.log(16.0) + 1)
    _, scale = REGISTRY["yarn"](factor=16.0, attention_factor=1.5).bind(spec()).frequencies(spec())
    assert scale == 1.5


@settings(max_examples=30, deadline=None)
@given(d=dims, s=st.floats(1.5, 32.0), base=bases)
def test_ntk_by_parts_limits(d, s, base):
    L0 = 4096
    plain = rope_inv_freq(base, d)
    inv = ntk_by_parts_inv_freq(plain, s, L0, alpha=1.0, beta=32.0)
    r = L0 * plain / (2 * math.pi)
    assert torch.allclose(inv[r > 32], plain[r > 32]) and torch.allclose(inv[r < 1], plain[r < 1] / s)


def test_llama3_keeps_high_and_scales_low_frequencies():
    plain = rope_inv_freq(5e5, 128)
    inv = llama3_inv_freq(plain, 8.0, 8192, 1.0, 4.0)
    wavelen = 2 * math.pi / plain
    assert torch.equal(inv[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    assert torch.allclose(inv[wavelen > 8192], plain[wavelen > 8192] / 8)


@pytest.mark.parametrize("name", ["pi", "ntk", "ntk_by_parts", "yarn", "llama3"])
def test_factor_one_is_plain_rope_bitwise(name):
    inv, scale = REGISTRY[name](factor=1.0).bind(spec()).frequencies(spec())
    assert torch.equal(inv, rope_inv_freq(1e4, 64)) and scale == 1.0


@pytest.mark.parametrize("name", ["dynamic_ntk", "dynamic_yarn"])
def test_dynamic_methods_are_plain_inside_trained_length_and_grow_past_it(name):
    m = REGISTRY[name]().bind(spec())
    inside, s_in = m.frequencies(spec(), seq_len=100)
    assert torch.equal(inside, rope_inv_freq(1e4, 64)) and s_in == 1.0
    past, _ = m.frequencies(spec(), seq_len=1024)
    assert past[-1] < inside[-1] and past[0] == inside[0]


def test_target_length_gives_factor():
    m = REGISTRY["yarn"](target_length=1024).bind(spec(L0=128))
    assert m.factor == 8.0
    with pytest.raises(ValueError, match=r"yarn: factor=4\.0 and target_length=1024 disagree"):
        REGISTRY["yarn"](target_length=1024, factor=4.0).bind(spec(L0=128))
    with pytest.raises(ValueError, match="factor .* or target_length"):
        REGISTRY["pi"]().bind(spec())
