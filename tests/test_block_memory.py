"""InfLLM-style block memory (``block_memory``): the attention against the dense float64 reference
of ``reference_block_memory`` (written from the paper), its identity and ReRoPE cases, cached
decoding against full recomputes, unpatch, determinism and parameter checks."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from conftest import TRAINED, make_tiny, method_params
from reference_block_memory import block_memory_attention, dense_inputs, rope_theta
from registry_suite import assert_same, positions, snapshot

import rope_ext
from rope_ext._compat import cache_kwarg
from rope_ext.methods import block_memory as bm
from rope_ext.methods.base import rope_inv_freq
from rope_ext.methods.context import AttentionContext
from rope_ext.methods.spec import RopeSpec
from rope_ext.rotary import cos_sin, rotate

D, BASE = 16, 10000.0
SMALL = dict(window=10, init_tokens=3, block_size=4, representatives=2, topk=3, lookup_queries=4)
PARAMS = [SMALL, {**SMALL, "init_tokens": 0, "representatives": 4, "topk": 1, "lookup_queries": 1},
          {**SMALL, "window": 7, "block_size": 5, "representatives": 1, "topk": 2, "lookup_queries": 9}]


def context(q_pos: torch.Tensor, k_pos: torch.Tensor, padding: torch.Tensor | None, softcap: float | None = None) -> AttentionContext:
    """An AttentionContext as the glue builds it: plain RoPE tables, the model mask from ``padding``
    (None: no mask, plain causal), SDPA as the base attention."""
    inv_freq = rope_inv_freq(BASE, D)
    mask = None
    if padding is not None:
        allowed = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & padding[:, None, None, :]
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def rot(x, pos, tag=None):
        cos, sin = cos_sin(inv_freq, pos, 1.0, x.dtype)
        return rotate(x, cos, sin)

    def base(q, k, v, mask=None):
        g = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=ctx.additive(q.dtype), scale=D ** -0.5).transpose(1, 2)

    ctx = AttentionContext(spec=None, q_pos=q_pos, k_pos=k_pos, mask=mask, scaling=D ** -0.5, softcap=softcap, rotate=rot, base=base,
                           causal=None, frequencies=lambda: (inv_freq, 1.0))
    return ctx


def method(**params) -> bm.BlockMemory:
    return bm.BlockMemory(**params, original_max_position_embeddings=TRAINED)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "-".join(map(str, p.values())))
@pytest.mark.parametrize("chunk", [bm.CHUNK, 7])
def test_attention_equals_the_dense_reference_gqa_left_padding(params, chunk, monkeypatch):
    monkeypatch.setattr(bm, "CHUNK", chunk)
    q, k, v, pos, pad = dense_inputs(2, 4, 2, 70, D, pad=7)
    got = method(**params).attend(q, k, v, context(pos, pos, pad))
    ref = block_memory_attention(q, k, v, pos, pad, params, rope_theta(BASE, D), 1.0, D, D ** -0.5)
    assert (got.double() - ref)[pad].abs().max() <= 2e-6


@pytest.mark.parametrize("chunk", [bm.CHUNK, 7])
def test_attention_without_a_mask_and_with_a_softcap_equals_the_reference(chunk, monkeypatch):
    monkeypatch.setattr(bm, "CHUNK", chunk)
    q, k, v, pos, pad = dense_inputs(2, 4, 1, 60, D, pad=0, seed=2)
    got = method(**SMALL).attend(q, k, v, context(pos, pos, None))
    ref = block_memory_attention(q, k, v, pos, pad, SMALL, rope_theta(BASE, D), 1.0, D, D ** -0.5)
    assert (got.double() - ref).abs().max() <= 2e-6
    ref_capped = block_memory_attention(q, k, v, pos, pad, SMALL, rope_theta(BASE, D), 1.0, D, D ** -0.5, softcap=1.5)
    assert (ref_capped - ref).abs().max() > 1e-2
    for padding in (pad, None):  # the dense differentiable path, with the model's mask and aligned without
        capped = method(**SMALL).attend(q, k, v, context(pos, pos, padding, softcap=1.5))
        assert (capped.double() - ref_capped).abs().max() <= 2e-6


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("chunk", [bm.CHUNK, 7])
def test_training_gradients_equal_the_references(padded, chunk, monkeypatch):
    """Under autograd (the dense differentiable path) the gradients of q, k, v are the reference's,
    with the model's padding mask and without a mask (aligned rows: the split local part)."""
    monkeypatch.setattr(bm, "CHUNK", chunk)
    q, k, v, pos, pad = dense_inputs(2, 4, 2, 40, D, pad=7 if padded else 0)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    weights = torch.randn(2, 40, 4, D, dtype=torch.float64)
    got = method(**SMALL).attend(q, k, v, context(pos, pos, pad if padded else None))
    grads = torch.autograd.grad((got.double()[pad] * weights[pad]).sum(), (q, k, v))
    ref = block_memory_attention(q, k, v, pos, pad, SMALL, rope_theta(BASE, D), 1.0, D, D ** -0.5)
    expected = torch.autograd.grad((ref[pad] * weights[pad]).sum(), (q, k, v))
    assert all((a - b).abs().max() <= 2e-6 for a, b in zip(grads, expected))


def test_bfloat16_attention_is_within_its_rounding_of_the_reference():
    q, k, v, pos, pad = dense_inputs(2, 4, 2, 70, D, pad=7, seed=1)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = method(**SMALL).attend(q, k, v, context(pos, pos, pad))
    assert got.dtype == torch.bfloat16
    ref = block_memory_attention(q, k, v, pos, pad, SMALL, rope_theta(BASE, D), 1.0, D, D ** -0.5)
    assert (got.double() - ref)[pad].abs().max() <= 3e-2


def test_selection_matters_in_the_reference_cases():
    """The cases above see the lookup: keeping every block, or looking up by each query alone,
    changes the reference's output."""
    q, k, v, pos, pad = dense_inputs(2, 4, 2, 70, D, pad=7)
    theta = rope_theta(BASE, D)
    few = block_memory_attention(q, k, v, pos, pad, SMALL, theta, 1.0, D, D ** -0.5)
    every = block_memory_attention(q, k, v, pos, pad, {**SMALL, "topk": 100}, theta, 1.0, D, D ** -0.5)
    alone = block_memory_attention(q, k, v, pos, pad, {**SMALL, "lookup_queries": 1}, theta, 1.0, D, D ** -0.5)
    assert (few - every)[pad].abs().max() > 1e-2 and (few - alone)[pad].abs().max() > 1e-2


@pytest.mark.parametrize("n", [1, 3, 8])
def test_lookup_sums_the_last_n_queries_and_pieces_equal_one_call(n):
    """The lookup score is the sum of the row's last n real queries' scores; calls over the pieces
    of a sequence, each given the previous call's last n - 1 queries, give the one-call sums."""
    q, reps = torch.randn(2, 4, 20, 5), torch.randn(2, 2, 6, 5)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False
    window = bm.lookup_window(q, valid, None, n)
    whole = bm.window_sums(bm.block_scores(window, reps), n)
    kept = q.masked_fill(~valid[:, None, :, None], 0.0)
    lookup = torch.stack([kept[:, :, max(0, i - n + 1): i + 1].sum(dim=2) for i in range(20)], dim=2)
    assert torch.allclose(whole, bm.block_scores(lookup, reps), atol=1e-4)
    assert window.shape[2] == n - 1 + 20 and torch.equal(window[:, :, n - 1:], kept)
    past, pieces = None, []
    for s, e in [(0, 7), (7, 8), (8, 15), (15, 20)]:
        window = bm.lookup_window(q[:, :, s:e], valid[:, s:e], past, n)
        pieces.append(bm.window_sums(bm.block_scores(window, reps), n))
        past = window[:, :, window.shape[2] - (n - 1):]
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-4)
    with pytest.raises(ValueError, match=r"lookup queries of shape \(1, 4, 2, 5\)"):
        bm.lookup_window(q, valid, torch.zeros(1, 4, 2, 5), 3 if n != 3 else 4)


def test_representatives_are_the_block_mean_or_its_most_aligned_keys():
    blocks = torch.randn(3, 5, 6, 8, dtype=torch.float64)
    assert torch.allclose(bm.representatives(blocks, 6), blocks.mean(dim=-2))
    best = (blocks * blocks.mean(dim=-2, keepdim=True)).sum(-1).argmax(-1)
    assert torch.equal(bm.representatives(blocks, 1), blocks.gather(-2, best[..., None, None].expand(3, 5, 1, 8))[..., 0, :])


def test_selection_is_deterministic_and_ties_go_to_the_earlier_block():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 3.0, 0.0]]])
    candidate = torch.tensor([[[True, True, False, True, True]]])
    assert bm.select_blocks(scores, candidate, 2).tolist() == [[[False, True, False, True, False]]]
    q, k, v, pos, pad = dense_inputs(2, 4, 2, 70, D, pad=7)
    ctx = context(pos, pos, pad)
    assert torch.equal(method(**SMALL).attend(q, k, v, ctx), method(**SMALL).attend(q, k, v, ctx))


@torch.no_grad()
def test_window_covering_the_input_is_plain_rope_bitwise_and_unpatch_restores():
    model = make_tiny("llama")
    ids = torch.randint(3, 97, (2, 24))
    plain = model(ids).logits
    before = snapshot(model)
    with rope_ext.patched(model, "block_memory", **{**SMALL, "window": 24}):
        assert torch.equal(model(ids).logits, plain)
    long_ids = torch.randint(3, 97, (2, 80))
    plain_long = model(long_ids).logits
    with rope_ext.patched(model, "block_memory", **SMALL):
        assert not torch.allclose(model(long_ids).logits, plain_long, atol=1e-3)
    assert torch.equal(model(long_ids).logits, plain_long)
    assert_same(before, snapshot(model))


@torch.no_grad()
def test_top_k_covering_every_block_is_rerope_at_the_window():
    """With every block selected each far key is attended at distance w: ReRoPE (Su 2023)."""
    model = make_tiny("qwen2", initializer_range=0.1)
    ids = torch.randint(3, 97, (2, 90))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    pos = positions(mask)
    with rope_ext.patched(model, "rerope", window=SMALL["window"]):
        rerope = model(ids, attention_mask=mask, position_ids=pos).logits
    with rope_ext.patched(model, "block_memory", **{**SMALL, "topk": 90}):
        every = model(ids, attention_mask=mask, position_ids=pos).logits
    with rope_ext.patched(model, "block_memory", **SMALL):
        some = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (every - rerope)[real].abs().max() <= 2e-5
    assert (some - rerope)[real].abs().max() >= 1e-2


@pytest.mark.parametrize("dtype,tol,B,topk", [(torch.float32, 1e-4, 2, None), (torch.bfloat16, 0.1, 2, 100),
                                               (torch.float32, 1e-4, 1, None)])
@pytest.mark.parametrize("step", [1, 3])
@torch.inference_mode()
def test_cached_generation_equals_full_recompute(dtype, tol, B, topk, step):
    """Batch 2 with row 0 left-padded by 5 (or one unpadded row: no mask, the banded path): cached
    decoding (token by token, or 3 at a time) gives the logits of recomputing the whole sequence,
    past the window and many blocks. In bfloat16 the two compute the layers' inputs with different
    roundings, so two blocks whose scores tie to that rounding may be picked differently (this tiny
    random model has such ties: 0.47 apart in the logits); there every block is attended, which
    checks the bfloat16 arithmetic of the rest."""
    model = make_tiny("llama", dtype=dtype, initializer_range=0.1)
    given = {} if topk is None else {"topk": topk}
    params = method_params("block_memory", model, 80, lookup_queries=5, **given)
    L, prefix = 80, 44
    ids = torch.randint(3, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if B == 2:
        mask[0, :5], ids[0, :5] = 0, 0
    pos = positions(mask)
    with rope_ext.patched(model, "block_memory", **params):
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = {cache_kwarg(model): DynamicCache(config=model.config)}
        model(ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=pos[:, :prefix], use_cache=True, **cache)
        worst = 0.0
        for t in range(prefix, L, step):
            e = min(t + step, L)
            got = model(ids[:, t:e], attention_mask=mask[:, :e], position_ids=pos[:, t:e], use_cache=True, **cache).logits
            worst = max(worst, (got.float() - full[:, t:e].float()).abs().max().item())
    assert worst <= tol


@pytest.mark.parametrize("given,message", [
    ({"representatives": 5}, r"representatives=5 must be <= block_size=4"),
    ({"block_size": 0}, r"block_size must be an integer >= 1, got 0"),
    ({"topk": 0}, r"topk must be an integer >= 1, got 0"),
    ({"lookup_queries": 0}, r"lookup_queries must be an integer >= 1, got 0"),
    ({"init_tokens": -1}, r"init_tokens must be an integer >= 0, got -1"),
    ({"window": 0}, r"window must be an integer >= 1, got 0"),
    ({"window": TRAINED}, rf"window={TRAINED} must be < the trained length {TRAINED}"),
])
def test_bad_parameters_are_refused_before_the_model_changes(given, message):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        rope_ext.patch(model, "block_memory", **{**SMALL, **given})
    assert rope_ext.current(model) is None
    assert_same(before, snapshot(model))


def test_defaults_are_infllms_llama3_config_with_the_block_mean_as_representative():
    spec = RopeSpec(rope_theta=500000.0, rotary_dim=128, trained_length=8192, head_dim=128, num_heads=32)
    assert bm.BlockMemory.defaults_for(spec, 32768) == dict(window=4096, block_size=128, init_tokens=128,
                                                           representatives=128, topk=16, lookup_queries=512)
    smaller = bm.BlockMemory.defaults_for(spec, 32768, block_size=64)
    assert (smaller["topk"], smaller["representatives"], smaller["init_tokens"]) == (32, 64, 64)


@torch.inference_mode()
def test_beam_reordering_carries_the_lookup_queries():
    """A cache reordered between steps (as beam search does) decodes the reordered rows exactly:
    each layer's lookup queries move with their row."""
    model = make_tiny("llama", initializer_range=0.1)
    params = method_params("block_memory", model, 80, lookup_queries=5)
    ids = torch.randint(3, 97, (2, 80))
    with rope_ext.patched(model, "block_memory", **params):
        swapped = model(ids.flip(0)).logits[:, 60:]
        cache = {cache_kwarg(model): DynamicCache(config=model.config)}
        model(ids[:, :60], use_cache=True, **cache)
        cache[cache_kwarg(model)].reorder_cache(torch.tensor([1, 0]))
        got = torch.cat([model(ids.flip(0)[:, t:t + 1], use_cache=True, **cache).logits for t in range(60, 80)], dim=1)
    assert (got - swapped).abs().max() <= 1e-4
