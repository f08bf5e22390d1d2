"""LongNet dilated attention (``rope_ext.methods.dilated``) against the dense oracle of
``reference_model.dilated_combination`` (a boolean mask per (w, r, head), softmax per pair, explicit
log-sum-exp weights, float64): both paths, gradients, the dense special case, cached decoding and
the parameter checks."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import TRAINED, main_spec, make_tiny
from reference_model import dilated_combination
from registry_suite import check_cached_generation_equals_recompute, check_identity_bitwise, check_training_step, snapshot

import rope_ext
from rope_ext.methods.dilated import Dilated, dilated_attention, pair_backward_eager, pair_backward_flash

CONFIGS = [((8, 16, 32), (1, 2, 4)), ((6, 12, 48), (1, 3, 6)), ((4, 8, 16, 32, 64), (1, 2, 4, 8, 16)), ((16,), (1,))]
SCALE = 0.3


def oracle(q, k, v, q_pos, k_pos, segments, dilations, allowed=None, softcap=None):
    """(B, Lq, H, d) in float64 from dense score matrices."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * SCALE
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = q_pos[:, None, :, None], k_pos[:, None, None, :]
    causal = (j <= i) if allowed is None else (j <= i) & allowed
    return dilated_combination(s, v, i, j, causal, segments, dilations).transpose(1, 2)


def qkv(B=2, H=4, Hkv=2, L=37, d=8, Lq=None, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(L * 7 + H)
    q = torch.randn(B, H, Lq or L, d, generator=g)
    k, v = (torch.randn(B, Hkv, L, d, generator=g) for _ in range(2))
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


def left_padded(B: int, L: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, L) counting real tokens, key-validity mask (B, 1, 1, L)); row 0 left-padded."""
    real = torch.ones(B, L, dtype=torch.bool)
    real[0, :pad] = False
    return (real.cumsum(-1) - 1).clamp(min=0), real[:, None, None, :]


@pytest.mark.parametrize("segments,dilations", CONFIGS)
@pytest.mark.parametrize("L", [37, 64, 100])
def test_unpadded_path_equals_the_dense_oracle(segments, dilations, L):
    q, k, v = qkv(L=L)
    pos = torch.arange(L)[None].expand(2, -1)
    got = dilated_attention(q, k, v, pos, pos, segments, dilations, None, SCALE)
    assert torch.allclose(got.double(), oracle(q, k, v, pos, pos, segments, dilations), atol=2e-6)


@pytest.mark.parametrize("segments,dilations", CONFIGS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_masked_path_with_padding_and_softcap_equals_the_dense_oracle(segments, dilations, softcap):
    L = 300  # more than one query block of the masked path
    q, k, v = qkv(L=L)
    pos, real = left_padded(2, L, 11)
    allowed = real & (torch.arange(L)[None, None, None, :] <= torch.arange(L)[None, None, :, None])
    got = dilated_attention(q, k, v, pos, pos, segments, dilations, allowed, SCALE, softcap)
    expected = oracle(q, k, v, pos, pos, segments, dilations, allowed, softcap)
    assert torch.allclose(got[:, 11:].double(), expected[:, 11:], atol=2e-6)
    assert torch.allclose(got[1].double(), expected[1], atol=2e-6)


def test_masked_path_equals_the_unpadded_path():
    q, k, v = qkv(L=70)
    pos = torch.arange(70)[None].expand(2, -1)
    causal = torch.ones(70, 70, dtype=torch.bool).tril()[None, None]
    segments, dilations = (8, 32, 128), (1, 4, 8)
    fast = dilated_attention(q, k, v, pos, pos, segments, dilations, None, SCALE)
    masked = dilated_attention(q, k, v, pos, pos, segments, dilations, causal, SCALE)
    assert torch.allclose(fast, masked, atol=2e-6)


@pytest.mark.parametrize("L", [1, 2, 40])
def test_decoding_queries_see_their_pairs_keys(L):
    """The last Lq queries over all keys (a KV cache), positions shifted by left padding."""
    Lk = 90
    q, k, v = qkv(L=Lk, Lq=L)
    pos, real = left_padded(2, Lk, 5)
    segments, dilations = (16, 32, 64), (1, 2, 4)
    got = dilated_attention(q, k, v, pos[:, -L:], pos, segments, dilations, real, SCALE)
    assert torch.allclose(got.double(), oracle(q, k, v, pos[:, -L:], pos, segments, dilations, real), atol=2e-6)


@pytest.mark.parametrize("segments", [(64,), (100,), (64, 128)])
def test_one_dense_pair_is_causal_attention(segments):
    """w >= length with r = 1 is plain causal attention (two such pairs: the same softmax, doubled)."""
    q, k, v = qkv(L=64, Hkv=4)
    pos = torch.arange(64)[None].expand(2, -1)
    got = dilated_attention(q, k, v, pos, pos, segments, (1,) * len(segments), None, SCALE)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
    assert torch.allclose(got, dense.transpose(1, 2), atol=2e-6)


def grads(fn, q, k, v):
    g = torch.Generator().manual_seed(3)
    out = fn(q, k, v)
    (out * torch.randn(out.shape, generator=g).to(out.dtype)).sum().backward()
    return [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("segments,dilations", CONFIGS[:3])
@pytest.mark.parametrize("padded", [False, True])
def test_gradients_equal_the_oracles(segments, dilations, padded):
    L = 45
    pos, real = left_padded(2, L, 6 if padded else 0)
    allowed = (real & torch.ones(L, L, dtype=torch.bool).tril()) if padded else None
    got = grads(lambda q, k, v: dilated_attention(q, k, v, pos, pos, segments, dilations, allowed, SCALE), *qkv(L=L, grad=True))
    ref = grads(lambda q, k, v: oracle(q, k, v, pos, pos, segments, dilations, allowed),
                *qkv(L=L, dtype=torch.float64, grad=True))
    for a, b in zip(got, ref):
        assert torch.allclose(a.double(), b, atol=1e-5), (a.double() - b).abs().max()


def test_gradients_of_inputs_in_the_models_layout():
    """q, k, v as attention modules pass them ((B, L, H, d) transposed: not contiguous), L a multiple
    of every segment (no padding copy: gathers read the inputs' own strides): gradients as the oracle's."""
    segments, dilations = (8, 16, 32), (1, 2, 4)
    pos = torch.arange(32)[None].expand(2, -1)

    def transposed(q, k, v):
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        return dilated_attention(q, k, v, pos, pos, segments, dilations, None, SCALE)

    got = grads(transposed, *qkv(L=32, grad=True))
    ref = grads(lambda q, k, v: oracle(q, k, v, pos, pos, segments, dilations), *qkv(L=32, dtype=torch.float64, grad=True))
    for a, b in zip(got, ref):
        assert torch.allclose(a.double(), b, atol=1e-5), (a.double() - b).abs().max()


def test_eager_backward_equals_torchs_flash_backward():
    """The device-independent backward of one pair equals torch's CPU flash backward, given a
    combined output and log-sum-exp from a larger softmax (a second, disjoint key set)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 3, 12, 8, generator=g) for _ in range(4))
    s = q @ k.transpose(-1, -2) * SCALE
    s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -math.inf)
    extra = torch.randn(2, 3, 12, 5, generator=g)  # scores of keys another pair holds
    lse = torch.logsumexp(torch.cat([s, extra], -1), -1)
    out = torch.exp(s - lse[..., None]) @ v + torch.exp(extra - lse[..., None]) @ torch.randn(5, 8, generator=g)
    for a, b in zip(pair_backward_eager(dout, q, k, v, out, lse, SCALE), pair_backward_flash(dout, q, k, v, out, lse, SCALE)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("params", [None, {"segments": (8, 16, 64), "dilations": (1, 2, 4)}])
def test_cached_generation_equals_full_recompute(family, params):
    check_cached_generation_equals_recompute("dilated", family, params)


def test_training_step_and_identity():
    check_training_step("dilated", "llama", {"segments": (8, 16, 64), "dilations": (1, 2, 4)})
    check_identity_bitwise("dilated", "llama")


def test_defaults_are_geometric_from_the_trained_length():
    spec = main_spec(make_tiny("llama"))
    assert Dilated.defaults_for(spec, TRAINED) == {"segments": (TRAINED,), "dilations": (1,)}
    assert Dilated.defaults_for(spec, 3 * TRAINED) == {"segments": (32, 64, 128), "dilations": (1, 2, 4)}
    assert Dilated.defaults_for(spec, 100, segments=(4, 8), dilations=(1, 2)) == {"segments": (4, 8), "dilations": (1, 2)}
    assert Dilated.defaults_for(spec, 65, original_max_position_embeddings=16)["segments"] == (16, 32, 64, 128)


def test_the_patched_model_runs_dilated_attention():
    """Past the trained length the patched model's logits differ from plain RoPE, and a padded row's
    real tokens get the logits of the same tokens unpadded (segments follow true positions)."""
    model = make_tiny("llama")
    ids = torch.randint(3, 97, (1, 80))
    with torch.no_grad():
        plain = model(ids).logits
        with rope_ext.patched(model, "dilated", segments=(8, 32, 128), dilations=(1, 2, 4)):
            alone = model(ids).logits
            batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), ids], 1), torch.randint(3, 97, (1, 89))])
            mask = torch.ones(2, 89, dtype=torch.long)
            mask[0, :9] = 0
            padded = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert not torch.allclose(alone, plain, atol=1e-3)
    assert torch.allclose(padded[0, 9:], alone[0], atol=1e-4)


@pytest.mark.parametrize("params,match", [
    ({"segments": (16, 8), "dilations": (1, 2)}, r"segments must be strictly ascending .* got \(16, 8\)"),
    ({"segments": (8, 8), "dilations": (1, 2)}, r"segments must be strictly ascending"),
    ({"segments": (8, 16), "dilations": (2, 1)}, r"dilations must be ascending .* got \(2, 1\)"),
    ({"segments": (8, 18), "dilations": (1, 4)}, r"segment 18 is not divisible by its dilation 4"),
    ({"segments": (8, 16, 32), "dilations": (1, 2)}, r"segments \(8, 16, 32\) and dilations \(1, 2\) must have the same length"),
    ({"segments": (0, 16), "dilations": (1, 2)}, r"segments\[0\] must be an integer >= 1, got 0"),
    ({"segments": (8, 16), "dilations": (0, 2)}, r"dilations\[0\] must be an integer >= 1, got 0"),
    ({"segments": (8, 16), "dilations": (2, 4)}, r"first dilation must be 1"),
    ({"segments": (), "dilations": ()}, r"segments must be a non-empty tuple of ints, got \(\)"),
    ({"segments": 8, "dilations": (1,)}, r"segments must be a non-empty tuple of ints, got 8"),
])
def test_bad_pairs_are_refused_before_the_model_changes(params, match):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        rope_ext.patch(model, "dilated", **params)
    assert rope_ext.current(model) is None and snapshot(model)[2:] == before[2:]


def test_non_integers_are_refused_and_lists_are_the_same_pairs():
    with pytest.raises(TypeError, match=r"segments\[1\] must be int, got float: 16.0"):
        Dilated(segments=(8, 16.0), dilations=(1, 2))
    with pytest.raises(TypeError, match=r"dilations\[0\] must be int, got bool"):
        Dilated(segments=(8,), dilations=(True,))
    assert Dilated(segments=[8, 16], dilations=[1, 2]) == Dilated(segments=(8, 16), dilations=(1, 2))
