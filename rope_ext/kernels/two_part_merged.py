"""Two-part attention (ReRoPE family) from two SDPA calls merged by log-sum-exp: no score matrix.

The reference (``two_part_reference.two_part_attention``) builds the near and far scores of every
query block and picks one per (i, j). Since each key is either near (0 <= p_i - p_j < w) or far, the
softmax over all keys splits into a softmax over the near keys (near q/k) and one over the far keys
(far q/k), recombined with their log-sum-exps (the merge used by flash-decoding and blockwise /
ring attention):
    out_i = (e^{l1_i - m} o1_i + e^{l2_i - m} o2_i) / (e^{l1_i - m} + e^{l2_i - m}),  m = max(l1_i, l2_i).
Queries are processed in blocks; the near call of block [s, e) reads only the keys
[s + offset - w + 1, e + offset) when positions follow the key index (checked once per call), so
the near part costs O(L * w). The far part is one causal SDPA call on the shifted square
(queries [w - offset, Lq) x keys [0, Lq + offset - w)) when positions are aligned and there is no
padding mask; otherwise a masked SDPA call per block. Equal to the reference to float rounding.

SDPA has no logit softcap: with ``softcap`` (Gemma 2) this falls back to the reference; so does
training (autograd enabled on inputs that need grad), since the blocks write into one output buffer.
"""
from __future__ import annotations

import torch

from .two_part_reference import two_part_attention


def _eager_lse(q, k, v, mask, causal, scaling):
    """(out, lse) from one score matrix: the fallback when no fused backend applies."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return torch.matmul(p.to(v.dtype), v), lse


def _additive(mask: torch.Tensor, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
    """0 / -inf float mask; with ``align`` its rows start on multiples of ``align`` elements (the
    memory-efficient CUDA kernel's requirement, as torch's own SDPA pads)."""
    lk = mask.shape[-1]
    padded = -(-lk // align) * align
    out = torch.zeros((*mask.shape[:-1], padded), dtype=dtype, device=mask.device)[..., :lk]
    return out.masked_fill_(~mask, float("-inf"))


def sdpa_lse(q, k, v, mask: torch.Tensor | None, causal: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling [masked]) v and its log-sum-exp (B, H, Lq) in float32.

    ``mask``: bool, True = may attend, broadcastable to (B, H, Lq, Lk); ``causal``: top-left causal
    (used only on square calls). Rows with every key masked come back as output 0, lse -inf.
    CPU: torch's flash kernel (same head size for q/k/v; it crashes on zero keys, never called so)."""
    if k.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), torch.full(q.shape[:-1], float("-inf"), device=q.device)
    if q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:
        float_mask = None if mask is None else _additive(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=float_mask, scale=scaling)
    elif q.device.type == "cuda":
        out, lse = _cuda_sdpa_lse(q, k, v, mask, causal, scaling)
    else:
        out, lse = _eager_lse(q, k, v, mask, causal, scaling)
    if mask is not None:
        empty = ~mask.any(dim=-1)
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def _cuda_sdpa_lse(q, k, v, mask, causal, scaling):
    """Flash attention when unmasked in half precision, else memory-efficient attention with an
    additive bias; both return the log-sum-exp. Falls back to the eager form if neither runs."""
    d = q.shape[-1]
    try:
        if mask is None and q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0 and v.shape[-1] == d:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
            return res[0], res[1]
        bias = None if mask is None else _additive(mask, q.dtype, align=16).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scaling)
        return res[0], res[1][..., : q.shape[2]]
    except RuntimeError:
        return _eager_lse(q, k, v, mask, causal, scaling)


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Combine two partial softmax-attention outputs over disjoint key sets by their log-sum-exps:
    e^l1 o1 + e^l2 o2 over e^l1 + e^l2, written as o2 + w (o1 - o2) with w = sigmoid(l1 - l2)
    (one pass over the outputs; w = 0 when both sets are empty, whose outputs are 0)."""
    w = torch.sigmoid(l1 - l2).nan_to_num_(0.0)[..., None]
    o1, o2 = o1.float(), o2.float()
    if out is not None and out.dtype == torch.float32:
        return torch.lerp(o2, o1, w, out=out)
    merged = torch.lerp(o2, o1, w)
    return merged if out is None else out.copy_(merged)


def _aligned(q_pos: torch.Tensor, k_pos: torch.Tensor, offset: int) -> bool:
    """Positions follow the key index (k_pos[b, j] = k_pos[b, 0] + j) and the queries are the last keys."""
    steps = torch.arange(k_pos.shape[1], device=k_pos.device)
    return torch.equal(k_pos, k_pos[:, :1] + steps) and torch.equal(q_pos, k_pos[:, offset:])


def _check(q_near, k_near, q_far, k_far, value, q_pos, k_pos, window, block_size) -> None:
    B, H, Lq, _ = q_near.shape
    Hkv, Lk = k_near.shape[1], k_near.shape[2]
    if q_far.shape != q_near.shape or k_far.shape != k_near.shape or value.shape[:3] != k_near.shape[:3]:
        raise ValueError(f"shapes disagree: q_near {tuple(q_near.shape)}, q_far {tuple(q_far.shape)}, k_near {tuple(k_near.shape)}, "
                         f"k_far {tuple(k_far.shape)}, value {tuple(value.shape)}")
    if Hkv == 0 or H % Hkv or k_near.shape[0] != B or Lk < Lq:
        raise ValueError(f"k/v must be (B={B}, Hkv dividing {H}, Lk >= {Lq}, d); got {tuple(k_near.shape)}")
    if q_pos.shape != (B, Lq) or k_pos.shape != (B, Lk):
        raise ValueError(f"q_pos must be ({B}, {Lq}) and k_pos ({B}, {Lk}); got {tuple(q_pos.shape)} and {tuple(k_pos.shape)}")
    if not isinstance(window, int) or window < 1 or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"window and block_size must be ints >= 1, got window={window!r}, block_size={block_size!r}")


def two_part_attention_merged(
    q_near: torch.Tensor,
    k_near: torch.Tensor,
    q_far: torch.Tensor,
    k_far: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    allowed: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block_size: int = 512,
) -> torch.Tensor:
    """Same contract and result as ``two_part_reference.two_part_attention`` (see there): q_*
    (B, H, Lq, d), k_* and value (B, Hkv, Lk, d) with Hkv dividing H, keys index-aligned with the
    queries (the last Lq keys are theirs); returns (B, Lq, H, dv)."""
    _check(q_near, k_near, q_far, k_far, value, q_pos, k_pos, window, block_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_near, k_near, q_far, k_far, value))
    if softcap is not None or needs_grad:
        return two_part_attention(q_near, k_near, q_far, k_far, value, q_pos, k_pos, window, allowed, scaling, softcap, block_size)
    offset = k_near.shape[2] - q_near.shape[2]
    aligned = _aligned(q_pos, k_pos, offset)
    if q_near.shape[2] == 1 and aligned and allowed is None:
        return _decode_step(q_near, k_near, q_far, k_far, value, window, scaling)
    group = q_near.shape[1] // k_near.shape[1]
    kn, kf, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k_near, k_far, value))
    out, lse_far, far_done = _far_square(q_far, kf, v, window, offset, scaling, aligned and allowed is None)
    _query_blocks(q_near, kn, q_far, kf, v, q_pos, k_pos, window, allowed, scaling, block_size, aligned, out,
                  lse_far if far_done else None)
    return out.transpose(1, 2).contiguous()


def _far_square(q_far, kf, v, window: int, offset: int, scaling: float, plain: bool):
    """(out, far lse, done): with aligned positions and no padding mask, every query's far keys
    [0, i + offset - window] form one shifted causal square (or one query seeing all of its far
    keys): one SDPA call, its output written into ``out``. Otherwise nothing is done here."""
    B, H, Lq, _ = q_far.shape
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=v.dtype, device=v.device)
    lse_far = torch.full((B, H, Lq), float("-inf"), device=v.device)
    n_far = Lq + offset - window
    if not plain or not (n_far <= Lq or Lq == 1):
        return out, lse_far, False
    q0 = min(Lq, max(0, Lq - n_far))  # queries before q0 have no far key
    out[:, :, :q0].zero_()
    if q0 < Lq:
        out[:, :, q0:], lse_far[:, :, q0:] = sdpa_lse(q_far[:, :, q0:], kf[:, :, :n_far], v[:, :, :n_far], None, n_far <= Lq, scaling)
    return out, lse_far, True


def _query_blocks(q_near, kn, q_far, kf, v, q_pos, k_pos, window: int, allowed, scaling: float, block_size: int,
                  aligned: bool, out: torch.Tensor, lse_far: torch.Tensor | None) -> None:
    """Per query block: the near part over the keys the window can reach (O(L * w)), the far part
    unless ``lse_far`` already holds it, merged into ``out`` by log-sum-exp."""
    Lq = q_near.shape[2]
    offset = kn.shape[2] - Lq
    starts = range(0, Lq, block_size)
    lows = [max(0, s + offset - window + 1) for s in starts]
    if not aligned:
        lows = _leak_free_lows(q_pos, k_pos, allowed, window, offset, block_size, lows)
    for start, lo in zip(starts, lows):
        end = min(start + block_size, Lq)
        stop = end + offset
        first = 0 if lse_far is None else lo
        rel = q_pos[:, None, start:end, None] - k_pos[:, None, None, first:stop]
        keep = rel >= 0
        if allowed is not None:
            keep = keep & allowed[..., start:end, first:stop]
        near = keep & (rel < window)
        plain = aligned and allowed is None and end - start == 1  # one aligned query: no key of [lo, stop) is masked
        o_n, l_n = sdpa_lse(q_near[:, :, start:end], kn[:, :, lo:stop], v[:, :, lo:stop], None if plain else near[..., lo - first:], False, scaling)
        if lse_far is not None:
            o_f, l_f = out[:, :, start:end], lse_far[:, :, start:end]
        else:
            hi = stop - window if aligned else stop  # aligned: no far key at or after end + offset - window
            far = keep[..., :hi] & (rel[..., :hi] >= window)
            if hi > 0:
                o_f, l_f = sdpa_lse(q_far[:, :, start:end], kf[:, :, :hi], v[:, :, :hi], None if plain else far, False, scaling)
            else:
                o_f, l_f = o_n.new_zeros(()).expand_as(o_n), torch.full_like(l_n, float("-inf"))
        merge(o_n, l_n, o_f, l_f, out=out[:, :, start:end])


def _decode_step(q_near, k_near, q_far, k_far, value, window: int, scaling: float) -> torch.Tensor:
    """One new query per row, positions following the key index: its near keys are the last
    ``window`` keys, its far keys all before them. The query heads sharing a KV head are laid out
    as that head's query rows (B, Hkv, group, d), so grouped KV heads are never repeated."""
    B, H, _, d = q_near.shape
    Hkv, Lk = k_near.shape[1], k_near.shape[2]
    n_far = max(0, Lk - window)
    qn, qf = q_near.reshape(B, Hkv, H // Hkv, d), q_far.reshape(B, Hkv, H // Hkv, d)
    o_n, l_n = sdpa_lse(qn, k_near[:, :, n_far:], value[:, :, n_far:], None, False, scaling)
    o_f, l_f = sdpa_lse(qf, k_far[:, :, :n_far], value[:, :, :n_far], None, False, scaling)
    out = merge(o_n, l_n, o_f, l_f).to(value.dtype)
    return out.reshape(B, H, 1, -1).transpose(1, 2).contiguous()


def _leak_free_lows(q_pos, k_pos, allowed, window, offset, block_size, lows) -> list[int]:
    """Per query block, the first key its near call must read: the aligned start where no kept near
    key lies before it (padding positions, packed rows), else 0. One device sync for all blocks."""
    leaks = []
    for start, lo in zip(range(0, q_pos.shape[1], block_size), lows):
        end = min(start + block_size, q_pos.shape[1])
        if lo == 0:
            leaks.append(torch.zeros((), dtype=torch.bool, device=q_pos.device))
            continue
        rel = q_pos[:, None, start:end, None] - k_pos[:, None, None, :lo]
        near = (rel >= 0) & (rel < window)
        if allowed is not None:
            near = near & allowed[..., start:end, :lo]
        leaks.append(near.any())
    return [0 if leak else lo for leak, lo in zip(torch.stack(leaks).tolist(), lows)]
