"""Dual Chunk Attention (``rope_ext.methods.dca``) against the dense float64 oracle built on
``reference_model.dca_relative`` (ChunkLlama's position tables): the index maps, every attention path
(by chunks, masked blocks, dense blocks with softcap / gradients), the identity case, cached
generation, unpatch and the parameter checks."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import TRAINED, main_spec, make_tiny
from reference_model import dca_relative as reference_relative
from reference_model import rope_theta
from registry_suite import (check_cached_generation_equals_recompute, check_identity_bitwise, check_patch_unpatch_bitwise,
                            check_training_step, positions, snapshot)

import rope_ext
from rope_ext._compat import cache_kwarg
from rope_ext.methods.dca import (DualChunkAttention, dca_attention, dca_key_positions, dca_query_positions,
                                  dca_relative)

SCALE = 0.3
D = 8
PARAMS = [(24, 4), (10, 6), (7, 0), (12, 3)]  # (chunk_size, local_window): s = 20, 4, 7, 9


def rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (B, H, L, d) to positions (B, L), in x's dtype via float64."""
    angles = pos.double()[:, None, :, None] * rope_theta(10000.0, x.shape[-1])
    angles = torch.cat([angles, angles], dim=-1)
    xd = x.double()
    half = torch.cat([-xd[..., x.shape[-1] // 2:], xd[..., : x.shape[-1] // 2]], dim=-1)
    return (xd * angles.cos() + half * angles.sin()).to(x.dtype)


def oracle(q, k, v, q_pos, k_pos, chunk_size, local_window, allowed=None, softcap=None):
    """(B, Lq, H, d) float64: S_ij = Re sum_f z_q z_k^* e^{i r'(i, j) theta_f} (RoFormer eq. 16) with
    r' from ChunkLlama's tables, causal by position, softmax, V."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    h = q.shape[-1] // 2
    zq, zk = torch.complex(q[..., :h], q[..., h:]), torch.complex(k[..., :h], k[..., h:])
    i, j = q_pos[:, None, :, None], k_pos[:, None, None, :]
    rel = reference_relative(chunk_size, local_window, i, j)
    turn = torch.exp(1j * rel[..., None] * rope_theta(10000.0, 2 * h))
    s = torch.einsum("bhif,bhjf,bhijf->bhij", zq, zk.conj(), turn).real * SCALE
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    keep = (j <= i) if allowed is None else (j <= i) & allowed
    return (torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0) @ v).transpose(1, 2)


def run(q, k, v, q_pos, k_pos, chunk_size, local_window, allowed=None, softcap=None):
    """dca_attention on q, k rotated to DCA's positions."""
    s = chunk_size - local_window
    qs = [rotate(q, p) for p in dca_query_positions(q_pos, chunk_size, local_window)]
    return dca_attention(*qs, rotate(k, dca_key_positions(k_pos, s)), v, q_pos, k_pos, s, allowed, SCALE, softcap)


def qkv(B=2, H=4, Hkv=2, L=50, Lq=None, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq or L, D, generator=g)
    k, v = (torch.randn(B, Hkv, L, D, generator=g) for _ in range(2))
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


def left_padded(B: int, L: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions counting real tokens, key-validity mask (B, 1, 1, L)); row 0 left-padded by ``pad``."""
    real = torch.ones(B, L, dtype=torch.bool)
    real[0, :pad] = False
    return (real.cumsum(-1) - 1).clamp(min=0), real[:, None, None, :]


@pytest.mark.parametrize("chunk_size,local_window", PARAMS)
def test_index_maps_give_chunkllamas_relative_positions(chunk_size, local_window):
    i, j = torch.arange(60)[:, None], torch.arange(60)[None, :]
    causal = j <= i
    expected = reference_relative(chunk_size, local_window, i, j)
    got = dca_relative(i, j, chunk_size, local_window)
    assert torch.equal(got.double()[causal], expected[causal])
    assert int(got[causal].max()) == min(2 * (chunk_size - local_window) - 1, chunk_size) and int(got[causal].min()) == 0


def test_paper_figure_2_example():
    """An et al. 2024, Fig. 2: s = 6, c = 10, w = 4 (ChunkLlama: chunk_size = c - 1 = 9, local_window = w - 1 = 3):
    P_q^succ = [6, 7, 8, 9, 9, 9], P_q^inter = 9, P_k = [0 .. 5, 0 .. 5]."""
    pos = torch.arange(12)[None]
    intra, succ, inter = dca_query_positions(pos, 9, 3)
    assert intra.tolist() == [[0, 1, 2, 3, 4, 5] * 2]
    assert succ.tolist() == [[6, 7, 8, 9, 9, 9] * 2] and inter.unique().tolist() == [9]
    assert dca_key_positions(pos, 6).tolist() == [[0, 1, 2, 3, 4, 5] * 2]


@pytest.mark.parametrize("chunk_size,local_window", PARAMS)
@pytest.mark.parametrize("L", [1, 9, 50, 333])
def test_unpadded_prefill_by_chunks_equals_the_oracle(chunk_size, local_window, L):
    q, k, v = qkv(L=L)
    pos = torch.arange(L)[None].expand(2, -1)
    got = run(q, k, v, pos, pos, chunk_size, local_window)
    assert torch.allclose(got.double(), oracle(q, k, v, pos, pos, chunk_size, local_window), atol=2e-6)


@pytest.mark.parametrize("Lq", [1, 5, 6, 23])
@pytest.mark.parametrize("first", [0, 7])
def test_queries_after_a_cache_equal_the_oracle(Lq, first):
    """The last Lq of 61 keys, positions starting at ``first`` (no mask): the by-chunks path with a
    query chunk that starts after its keys."""
    q, k, v = qkv(L=61, Lq=Lq)
    k_pos = (first + torch.arange(61))[None].expand(2, -1)
    got = run(q, k, v, k_pos[:, -Lq:], k_pos, 12, 3)
    assert torch.allclose(got.double(), oracle(q, k, v, k_pos[:, -Lq:], k_pos, 12, 3), atol=2e-6)


@pytest.mark.parametrize("chunk_size,local_window", PARAMS)
@pytest.mark.parametrize("Lq", [1, 7, 300])
def test_left_padded_gqa_batch_equals_the_oracle(chunk_size, local_window, Lq):
    """Batch 2, row 0 left-padded by 9, GQA (4 query heads, 2 KV heads): the masked-blocks path."""
    L = 300
    q, k, v = qkv(L=L, Lq=Lq)
    pos, real = left_padded(2, L, 9)
    allowed = real & (torch.arange(L)[None, None, None, :] <= torch.arange(L - Lq, L)[None, None, :, None])
    got = run(q, k, v, pos[:, -Lq:], pos, chunk_size, local_window, allowed)
    expected = oracle(q, k, v, pos[:, -Lq:], pos, chunk_size, local_window, allowed)
    rows = real[:, 0, 0, -Lq:]
    assert torch.allclose(got.double()[rows], expected[rows], atol=2e-6)


def test_softcap_equals_the_oracle():
    L = 280
    q, k, v = qkv(L=L)
    pos, real = left_padded(2, L, 5)
    allowed = real & torch.ones(L, L, dtype=torch.bool).tril()
    got = run(q, k, v, pos, pos, 12, 3, allowed, softcap=2.0)
    expected = oracle(q, k, v, pos, pos, 12, 3, allowed, softcap=2.0)
    assert torch.allclose(got.double()[:, 5:], expected[:, 5:], atol=2e-6)


def test_gradients_equal_the_oracles():
    L = 45
    pos = torch.arange(L)[None].expand(2, -1)
    weights = torch.randn(2, L, 4, D, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn, dtype in ((run, torch.float32), (oracle, torch.float64)):
        inputs = qkv(L=L, dtype=dtype, grad=True)
        (fn(*inputs, pos, pos, 12, 3) * weights.to(dtype)).sum().backward()
        grads.append([t.grad.double() for t in inputs])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("padded", [False, True])
def test_bfloat16_is_within_its_rounding_of_the_oracle(padded):
    """The merge runs in float32: a bf16 result is within bf16 rounding of the float64 oracle on
    bf16 inputs, and both paths agree with each other to that rounding."""
    L = 200
    q, k, v = qkv(L=L, dtype=torch.bfloat16)
    pos, real = left_padded(2, L, 6 if padded else 0)
    allowed = real & torch.ones(L, L, dtype=torch.bool).tril() if padded else None
    got = run(q, k, v, pos, pos, 24, 4, allowed)
    expected = oracle(q, k, v, pos, pos, 24, 4, allowed)
    assert got.dtype == torch.bfloat16
    assert (got.double() - expected)[:, 6:].abs().max() <= 2e-2


@pytest.mark.parametrize("L", [20, 64])
def test_a_chunk_covering_the_sequence_is_plain_rope_attention(L):
    """s >= L: DCA's positions are the true ones (intra only), so it is RoPE + causal SDPA."""
    q, k, v = qkv(L=L)
    pos = torch.arange(L)[None].expand(2, -1)
    got = run(q, k, v, pos, pos, L + 10, 10)
    qr, kr = rotate(q, pos), rotate(k, pos).repeat_interleave(2, 1)
    plain = torch.nn.functional.scaled_dot_product_attention(qr, kr, v.repeat_interleave(2, 1), is_causal=True, scale=SCALE)
    assert (got - plain.transpose(1, 2)).abs().max() <= 1e-6


def test_identity_patch_is_bitwise_and_unpatch_restores_the_model():
    check_identity_bitwise("dca", "llama")
    check_patch_unpatch_bitwise("dca", "llama")
    check_patch_unpatch_bitwise("dca", "qwen3", {"chunk_size": 12, "local_window": 3})


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_token_by_token_generation_equals_full_recompute(family):
    check_cached_generation_equals_recompute("dca", family)
    check_cached_generation_equals_recompute("dca", family, {"chunk_size": 10, "local_window": 2})


@pytest.mark.parametrize("padded", [False, True])
def test_generation_in_chunks_of_queries_equals_full_recompute(padded):
    """Prefill 20 tokens, then chunks of 9 queries through the KV cache (batch 2, row 0 left-padded
    by 5 when ``padded``), across several DCA chunks: every new row's logits equal a full recompute."""
    from transformers import DynamicCache

    model = make_tiny("llama")
    B, L = 2, 74
    ids = torch.randint(3, 97, (B, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, L, dtype=torch.long)
    if padded:
        mask[0, :5], ids[0, :5] = 0, 0
    pos = positions(mask)
    with torch.inference_mode(), rope_ext.patched(model, "dca", chunk_size=12, local_window=3):
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        bounds = [0, 20, *range(29, L, 9), L]
        for a, b in zip(bounds, bounds[1:]):
            step = model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], **{cache_kwarg(model): cache},
                         use_cache=True).logits
            real = mask[:, a:b].bool()
            assert (step - full[:, a:b])[real].abs().max() <= 1e-4, f"rows {a}:{b}"


def test_training_step():
    check_training_step("dca", "llama")


def test_defaults_are_chunkllamas():
    spec = main_spec(make_tiny("llama"))
    assert DualChunkAttention.defaults_for(spec, 3 * TRAINED) == {"chunk_size": 24, "local_window": 4}
    assert DualChunkAttention.defaults_for(spec, 100, local_window=2) == {"chunk_size": 24, "local_window": 2}
    assert DualChunkAttention.defaults_for(spec, 100, original_max_position_embeddings=64) == {
        "original_max_position_embeddings": 64, "chunk_size": 48, "local_window": 8}


@pytest.mark.parametrize("params,match", [
    ({"chunk_size": 12, "local_window": 12}, r"local_window=12 must be < chunk_size=12"),
    ({"chunk_size": 0, "local_window": 0}, r"chunk_size must be an integer >= 1, got 0"),
    ({"chunk_size": 12, "local_window": -1}, r"local_window must be an integer >= 0, got -1"),
    ({"chunk_size": 32, "local_window": 4}, r"chunk_size=32, local_window=4 attend at distances up to .* = 32, which must be "
                                            r"< the trained length \(original_max_position_embeddings=32\)"),
    ({"chunk_size": 40, "local_window": 30, "original_max_position_embeddings": 16},
     r"= 19, .*original_max_position_embeddings=16"),
])
def test_bad_parameters_are_refused_before_the_model_changes(params, match):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        rope_ext.patch(model, "dca", **params)
    assert rope_ext.current(model) is None and snapshot(model)[2:] == before[2:]


def test_wrong_types_are_refused_by_name():
    with pytest.raises(TypeError, match=r"chunk_size must be int, got float: 24.0"):
        DualChunkAttention(chunk_size=24.0, local_window=4)
    with pytest.raises(TypeError, match=r"local_window must be int, got bool"):
        DualChunkAttention(chunk_size=24, local_window=True)
