"""The merged two-part attention (two SDPA calls + log-sum-exp merge) equals the query-blocked
reference ``rope_ext.kernels.two_part_reference.two_part_attention`` on random inputs.

Tolerance: float32 1e-5 (both sides sum the same terms in a different order); bfloat16 2e-2
(each side rounds its partial outputs to bf16). Cases: windows 1, small, and >= the length; GQA,
MQA and plain heads; padding masks with HF's left-padding positions; packed rows whose positions
restart; decode (Lq = 1 with a cache) and chunked prefill (1 < Lq < Lk); several query blocks;
the banded CPU path (``banded_causal``) by near blocks and far chunks of every alignment.
These run on CPU tensors (the math); ``test_gpu_merged_equals_reference`` runs CUDA's flash /
memory-efficient SDPA at model sizes on ``kernel_device()`` where CUDA is present.
"""
from __future__ import annotations

import pytest
import torch

from rope_ext.kernels.two_part_merged import (
    BLOCK_SIZE,
    _eager_lse,
    banded_causal,
    merge,
    sdpa_lse,
    two_part_attention_merged,
)
from rope_ext.kernels.two_part_reference import two_part_attention
from kernel_device import gpu_only, kernel_device

F32 = dict(rtol=1e-5, atol=1e-5)


def inputs(B, H, Hkv, Lq, Lk, d, dtype=torch.float32, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return r(B, H, Lq, d), r(B, Hkv, Lk, d), r(B, H, Lq, d), r(B, Hkv, Lk, d), r(B, Hkv, Lk, dv or d)


def aligned_positions(B, Lq, Lk, start=0):
    k_pos = torch.arange(start, start + Lk)[None].expand(B, -1).clone()
    return k_pos[:, Lk - Lq:].clone(), k_pos


def both(tensors, q_pos, k_pos, window, allowed=None, scaling=0.35, softcap=None, block_size=512):
    args = (*tensors, q_pos, k_pos, window, allowed, scaling, softcap, block_size)
    return two_part_attention_merged(*args), two_part_attention(*args)


@pytest.mark.parametrize("window", [1, 3, 8, 37, 100])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("block_size", [512, 8])
def test_prefill_equals_reference(window, heads, block_size):
    H, Hkv = heads
    tensors = inputs(2, H, Hkv, 37, 37, 16, seed=window)
    got, ref = both(tensors, *aligned_positions(2, 37, 37), window, block_size=block_size)
    assert got.shape == ref.shape == (2, 37, H, 16)
    torch.testing.assert_close(got, ref, **F32)


@pytest.mark.parametrize("Lq", [1, 3, 12])
@pytest.mark.parametrize("window", [1, 5, 40])
def test_decode_and_chunked_prefill_with_cache(Lq, window):
    """Queries are the last Lq of Lk keys (KV cache), positions continuing past a start of 7."""
    tensors = inputs(2, 4, 2, Lq, 30, 8, seed=Lq)
    got, ref = both(tensors, *aligned_positions(2, Lq, 30, start=7), window, block_size=4)
    torch.testing.assert_close(got, ref, **F32)


@pytest.mark.parametrize("heads", [(6, 1), (6, 3), (4, 4)], ids=["MQA", "GQA3", "MHA"])
@pytest.mark.parametrize("window", [1, 29, 30])
def test_one_query_decode_folds_grouped_heads(heads, window):
    """The decode step lays a KV head's query heads out as its query rows; same result."""
    H, Hkv = heads
    tensors = inputs(3, H, Hkv, 1, 30, 8, seed=window)
    got, ref = both(tensors, *aligned_positions(3, 1, 30, start=2), window)
    torch.testing.assert_close(got, ref, **F32)


def hf_left_padding(B, L, pads):
    """HF generate's positions for left padding (pads get position 1) and the bool mask
    (B, 1, L, L): causal, pad keys hidden."""
    real = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(pads):
        real[b, :n] = False
    pos = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return pos, causal[None, None] & real[:, None, None, :]


@pytest.mark.parametrize("window", [1, 4, 64])
@pytest.mark.parametrize("block_size", [512, 5])
def test_padding_mask_equals_reference(window, block_size):
    B, L = 3, 23
    pos, allowed = hf_left_padding(B, L, pads=[0, 4, 11])
    tensors = inputs(B, 4, 2, L, L, 8, seed=window)
    got, ref = both(tensors, pos, pos, window, allowed=allowed, block_size=block_size)
    torch.testing.assert_close(got, ref, **F32)


@pytest.mark.parametrize("masked", [False, True])
def test_packed_rows_with_restarting_positions(masked):
    """Positions that do not follow the key index: near keys can lie before the aligned start of a
    block's near range; with a block-diagonal mask they are hidden, without one they must be read."""
    L, window = 20, 4
    pos = torch.cat([torch.arange(12), torch.arange(8)])[None]
    seq = torch.cat([torch.zeros(12), torch.ones(8)]).long()
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(L, L, dtype=torch.bool).tril() if masked else None
    tensors = inputs(1, 2, 1, L, L, 8, seed=3)
    got, ref = both(tensors, pos, pos, window, allowed=None if allowed is None else allowed[None, None], block_size=4)
    torch.testing.assert_close(got, ref, **F32)


@pytest.mark.parametrize("window", [1, 16, 37, 300])
@pytest.mark.parametrize("sizes", [(8, 24), (13, 50), (16, 16), (64, 1000)], ids=lambda s: f"block{s[0]}-far{s[1]}")
@pytest.mark.parametrize("Lq", [200, 77])
def test_banded_blocks_and_chunks_equal_reference(window, sizes, Lq):
    """The banded CPU path by near blocks and far chunks of every alignment (chunks that are not a
    multiple of the block, chunks starting before and after the first query with a far key, rows
    whose far keys all lie before the chunk), prefill (Lq = Lk) and chunked prefill (Lq < Lk)."""
    block_size, far_block = sizes
    tensors = inputs(2, 6, 2, Lq, 200, 8, seed=window + Lq)
    q_pos, k_pos = aligned_positions(2, Lq, 200, start=3)
    got = banded_causal(*tensors[:5], window, 0.4, block_size, far_block)
    ref = two_part_attention(*tensors, q_pos, k_pos, window, None, 0.4, None, 512)
    assert got.shape == ref.shape == (2, Lq, 6, 8)
    torch.testing.assert_close(got, ref, **F32)


def test_merged_takes_the_banded_path_on_aligned_prefill():
    """On aligned, unmasked CPU prefill the public function returns the banded path's result
    (a (B, Lq, H, d) view of a (B, H, Lq, d) buffer) and equals the reference."""
    tensors = inputs(1, 4, 1, 300, 300, 16, seed=11)
    got, ref = both(tensors, *aligned_positions(1, 300, 300), 40)
    assert got.stride()[1] == 16 and got.stride()[2] == 300 * 16  # rows within a head are adjacent
    torch.testing.assert_close(got, ref, **F32)
    torch.testing.assert_close(got, banded_causal(*tensors, 40, 0.35, 512), rtol=0, atol=0)


def test_bfloat16_and_value_dim():
    tensors = inputs(1, 4, 2, 33, 33, 16, dtype=torch.bfloat16, seed=5)
    got, ref = both(tensors, *aligned_positions(1, 33, 33), 6, block_size=16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    got = banded_causal(*tensors, 6, 0.35, 8, 12)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    tensors = inputs(1, 2, 2, 9, 9, 8, dv=12, seed=6)
    got, ref = both(tensors, *aligned_positions(1, 9, 9), 3)
    torch.testing.assert_close(got, ref, **F32)


def test_softcap_falls_back_to_the_reference():
    tensors = inputs(1, 2, 1, 10, 10, 8, seed=7)
    got, ref = both(tensors, *aligned_positions(1, 10, 10), 3, softcap=2.0)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_sdpa_lse_matches_eager_and_empty_rows():
    """The fused call's output and log-sum-exp equal the eager ones; fully masked rows give 0, -inf."""
    q, k, _, _, v = inputs(2, 3, 3, 5, 7, 8, seed=8)
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[0, 0, 2] = False
    out, lse = sdpa_lse(q, k, v, mask, False, 0.3)
    ref_out, ref_lse = _eager_lse(q, k, v, mask, False, 0.3)
    torch.testing.assert_close(out, ref_out.nan_to_num(0.0), **F32)
    torch.testing.assert_close(lse, ref_lse, **F32)
    assert torch.isneginf(lse[0, :, 2]).all() and (out[0, :, 2] == 0).all()


def test_merge_of_disjoint_key_sets_is_full_softmax():
    q, k, _, _, v = inputs(1, 2, 2, 4, 10, 8, seed=9)
    full, _ = _eager_lse(q, k, v, None, False, 0.5)
    o1, l1 = _eager_lse(q, k[:, :, :6], v[:, :, :6], None, False, 0.5)
    o2, l2 = _eager_lse(q, k[:, :, 6:], v[:, :, 6:], None, False, 0.5)
    torch.testing.assert_close(merge(o1, l1, o2, l2), full, **F32)
    empty = torch.full_like(l2, float("-inf"))
    torch.testing.assert_close(merge(o1, l1, torch.zeros_like(o2), empty), o1, **F32)


def test_bad_arguments_are_refused():
    tensors = inputs(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"k/v must be \(B=1, Hkv dividing 3, Lk >= 4, d\); got \(1, 2, 4, 8\)"):
        two_part_attention_merged(*tensors, *aligned_positions(1, 4, 4), 2, None, 0.3)
    tensors = inputs(1, 4, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=f"window and block_size must be ints >= 1, got window=0, block_size={BLOCK_SIZE}"):
        two_part_attention_merged(*tensors, *aligned_positions(1, 4, 4), 0, None, 0.3)
    with pytest.raises(ValueError, match="banded_causal needs .* got q \\(1, 4, 4, 8\\) on cpu, k \\(1, 2, 4, 8\\), v \\(1, 2, 4, 8\\), window=2, block_size=0"):
        banded_causal(*tensors, 2, 0.3, 0)
    with pytest.raises(ValueError, match=r"q_pos must be \(1, 4\)"):
        two_part_attention_merged(*tensors, torch.arange(3)[None], torch.arange(4)[None], 2, None, 0.3)


@gpu_only("flash / memory-efficient SDPA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_merged_equals_reference(dtype):
    tol = F32 if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    dev = kernel_device()
    for Lq, Lk, window, padded in ((300, 300, 64, False), (1, 500, 64, False), (17, 300, 64, False), (200, 200, 16, True)):
        tensors = [t.to(dev) for t in inputs(2, 8, 2, Lq, Lk, 64, dtype=dtype, seed=Lq)]
        if padded:
            pos, allowed = hf_left_padding(2, Lq, pads=[0, 37])
            q_pos, k_pos, allowed = pos.to(dev), pos.to(dev), allowed.to(dev)
        else:
            (q_pos, k_pos), allowed = (p.to(dev) for p in aligned_positions(2, Lq, Lk)), None
        args = (*tensors, q_pos, k_pos, window, allowed, 0.125, None, 128)
        torch.testing.assert_close(two_part_attention_merged(*args).float(), two_part_attention(*args).float(), **tol)
