"""Attention-level methods: position maps, ALiBi slopes, and the query-blocked two-part attention
against a naive two-full-matrices reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rope_ext.methods import REGISTRY
from rope_ext.methods.alibi import alibi_bias, alibi_slopes
from rope_ext.methods.base import rope_inv_freq
from rope_ext.methods.rerope import leaky_rerope_relative
from rope_ext.methods.self_extend import self_extend_relative
from rope_ext.rotary import cos_sin, rotate
from rope_ext.kernels.two_part_reference import two_part_attention


@settings(max_examples=50, deadline=None)
@given(w=st.integers(1, 64), i=st.integers(0, 500), j=st.integers(0, 500), k=st.floats(1.01, 32), G=st.integers(1, 16))
def test_far_positions_give_the_papers_relative_positions(w, i, j, k, G):
    if j > i:
        i, j = j, i
    q, kk = torch.tensor([[i]]), torch.tensor([[j]])
    rel = q - kk
    if rel.item() < w:
        return
    fq, fk = REGISTRY["rerope"](window=w).far_positions(q, kk)
    assert (fq - fk).item() == min(rel.item(), w) == w  # ReRoPE: rel' = min(rel, w)
    fq, fk = REGISTRY["leaky_rerope"](window=w, k=k).far_positions(q, kk)
    assert abs((fq - fk).item() - leaky_rerope_relative(rel, w, k).item()) < 1e-3
    fq, fk = REGISTRY["self_extend"](window=w, group_size=G).far_positions(q, kk)
    assert (fq - fk).item() == self_extend_relative(q, kk, G, w).item()


def test_alibi_slopes_match_the_paper_series():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** (-2 * i) for i in range(1, 5)]))
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i - 0.5) for i in range(1, 5)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(twelve))
    assert alibi_slopes(7).shape == (7,) and torch.all(alibi_slopes(7) > 0)
    bias = alibi_bias(alibi_slopes(2), torch.tensor([[3]]), torch.tensor([[0, 1, 2, 3]]))
    assert torch.allclose(bias[0, 0, 0], torch.tensor([-3.0, -2.0, -1.0, 0.0]) * 2 ** -4)  # slope of head 1 of 2: 2^(-8/2)


def naive_two_part(qn, kn, qf, kf, v, qp, kp, w, allowed, scaling, softcap=None):
    """The reference repositories' way: two full score matrices, then select and softmax."""
    g = qn.shape[1] // kn.shape[1]
    kn, kf, v = (t.repeat_interleave(g, 1) for t in (kn, kf, v))
    rel = qp[:, None, :, None] - kp[:, None, None, :]
    s = torch.where(rel < w, qn @ kn.transpose(-1, -2), qf @ kf.transpose(-1, -2)) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    keep = (rel >= 0) & (allowed if allowed is not None else True)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_two_part_equals_naive(window, Hkv, softcap):
    torch.manual_seed(window + Hkv)
    B, H, L, d = 2, 4, 37, 8
    qn, qf = torch.randn(2, B, H, L, d)
    kn, kf, v = torch.randn(3, B, Hkv, L, d)
    pos = torch.arange(L)[None].expand(B, -1)
    allowed = torch.ones(B, 1, L, L, dtype=torch.bool)
    allowed[0, :, :, :5] = False  # left padding of row 0
    out = two_part_attention(qn, kn, qf, kf, v, pos, pos, window, allowed, 0.3, softcap, block_size=8)
    ref = naive_two_part(qn, kn, qf, kf, v, pos, pos, window, allowed, 0.3, softcap)
    assert torch.allclose(out, ref, atol=1e-5)


def test_rerope_scores_inside_window_equal_plain_rope():
    """Inside the window, ReRoPE attention is RoPE attention: same output as SDPA on rotated q, k."""
    torch.manual_seed(0)
    B, H, L, d = 1, 2, 24, 16
    q, k, v = torch.randn(3, B, H, L, d)
    pos = torch.arange(L)[None]
    cos, sin = cos_sin(rope_inv_freq(1e4, d), pos, 1.0, torch.float32)
    qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
    out = two_part_attention(qr, kr, torch.zeros_like(q), torch.zeros_like(k), v, pos, pos, L, None, d ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=True).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_decode_shaped_two_part():
    torch.manual_seed(1)
    qn, qf = torch.randn(2, 1, 4, 1, 8)
    kn, kf, v = torch.randn(3, 1, 2, 30, 8)
    qp, kp = torch.tensor([[29]]), torch.arange(30)[None]
    out = two_part_attention(qn, kn, qf, kf, v, qp, kp, 7, None, 0.5)
    assert torch.allclose(out, naive_two_part(qn, kn, qf, kf, v, qp, kp, 7, None, 0.5), atol=1e-5)


def test_never_near_keys_counts_only_keys_outside_every_window():
    from rope_ext.methods.rerope import never_near_keys

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        B, Lk, w = 2, int(torch.randint(2, 30, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        k_pos = torch.sort(torch.randint(0, 40, (B, Lk), generator=g), dim=1).values
        Lq = int(torch.randint(1, Lk + 1, (1,), generator=g))
        q_pos = k_pos[:, -Lq:]
        start = never_near_keys(q_pos, k_pos, w)
        rel = q_pos[:, :, None] - k_pos[:, None, :]
        near_any = ((rel >= 0) & (rel < w)).any(dim=1)
        assert not near_any[:, :start].any()
        assert start == Lk or near_any[:, start].any() or (k_pos[:, start, None] > q_pos.min(1, keepdim=True).values - w).any()
