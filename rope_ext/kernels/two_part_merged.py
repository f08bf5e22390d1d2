"""Two-part attention (ReRoPE family) from two SDPA calls merged by log-sum-exp: no score matrix.

The reference (``two_part_reference.two_part_attention``) builds the near and far scores of every
query block and picks one per (i, j). Since each key is either near (0 <= p_i - p_j < w) or far, the
softmax over all keys splits into a softmax over the near keys (near q/k) and one over the far keys
(far q/k), recombined with their log-sum-exps (the merge used by flash-decoding and blockwise /
ring attention):
    out_i = (e^{l1_i - m} o1_i + e^{l2_i - m} o2_i) / (e^{l1_i - m} + e^{l2_i - m}),  m = max(l1_i, l2_i).
With positions following the key index, no padding mask and torch's CPU flash kernel (which
returns the log-sum-exp and takes GQA keys as they are), ``banded_causal`` runs: the near part by
query blocks over the band of keys the window can reach (O(L * (w + block))), the far part by
chunks of query rows (a causal call on its shifted square plus an unmasked call on the keys every
row of the chunk sees as far), each merged in place into one output buffer: about plain causal
SDPA's work plus the band, and its memory plus a chunk (benchmarks/rerope_attention.py). Otherwise
(padding masks, packed rows, CUDA, dv != d) the near call of each query block reads the keys
[s + offset - w + 1, e + offset) (or from 0 where positions leak), and the far part is one causal
call on the shifted square when aligned, else a masked call per block. Equal to the reference to
float rounding.

SDPA has no logit softcap: with ``softcap`` (Gemma 2) this falls back to the reference; so does
training (autograd enabled on inputs that need grad), since the blocks write into one output buffer.
"""
from __future__ import annotations

import torch

from .two_part_reference import two_part_attention

BLOCK_SIZE = 64  # query rows per near block: the band costs L * (window + block); at 8k its calls took
                 # 0.139 / 0.149 / 0.168 s with 64 / 128 / 256 rows (1 thread; 2 threads alike)
FAR_CHUNKS = 8  # the far part runs in about this many row chunks: its temporary is ~1/8 of the output
FAR_MIN_ROWS = 768  # >= 768 query rows keeps torch's CPU flash kernel on its 256-row tiles


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
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Same contract and result as ``two_part_reference.two_part_attention`` (see there): q_*
    (B, H, Lq, d), k_* and value (B, Hkv, Lk, d) with Hkv dividing H, keys index-aligned with the
    queries (the last Lq keys are theirs); returns (B, Lq, H, dv), on the banded CPU path a view of
    a (B, H, Lq, dv) buffer (as SDPA's own output; transformers reshapes it into a new tensor)."""
    _check(q_near, k_near, q_far, k_far, value, q_pos, k_pos, window, block_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_near, k_near, q_far, k_far, value))
    if softcap is not None or needs_grad:
        return two_part_attention(q_near, k_near, q_far, k_far, value, q_pos, k_pos, window, allowed, scaling, softcap, block_size)
    offset = k_near.shape[2] - q_near.shape[2]
    aligned = _aligned(q_pos, k_pos, offset)
    if q_near.shape[2] == 1 and aligned and allowed is None:
        return _decode_step(q_near, k_near, q_far, k_far, value, window, scaling)
    fused = _fused_cpu(q_near, value)
    if aligned and allowed is None and fused:
        return banded_causal(q_near, k_near, q_far, k_far, value, window, scaling, block_size)
    group = q_near.shape[1] // k_near.shape[1]
    kn, kf, v = (t.repeat_interleave(group, dim=1) if group > 1 and not fused else t for t in (k_near, k_far, value))
    out = value.new_empty(q_near.shape[0], q_near.shape[2], q_near.shape[1], value.shape[-1])
    heads = out.transpose(1, 2)
    lse_far = _far_square(q_far, kf, v, window, offset, scaling, aligned and allowed is None, heads)
    _query_blocks(q_near, kn, q_far, kf, v, q_pos, k_pos, window, allowed, scaling, block_size, aligned, heads, lse_far)
    return out


def _fused_cpu(q: torch.Tensor, v: torch.Tensor) -> bool:
    """True where ``sdpa_lse`` runs torch's CPU flash kernel (which takes GQA keys as they are)."""
    return q.device.type == "cpu" and v.shape[-1] == q.shape[-1]


def banded_causal(q_near, k_near, q_far, k_far, value, window: int, scaling: float, block_size: int = BLOCK_SIZE,
                  far_block: int | None = None) -> torch.Tensor:
    """Two-part attention for positions following the key index and no padding mask, on CPU:
    returns (B, Lq, H, d) as a view of one (B, H, Lq, d) buffer (transformers reshapes it anyway).

    Far part, by chunks of ``far_block`` query rows [s, e) (key indices [S, E) = [s, e) + offset):
    a causal call on the keys [S - w, E - w) and, when S > w, an unmasked call on the keys [0, S - w)
    that every query of the chunk sees as far; near part, by blocks of ``block_size`` rows: one call
    on the band [S - w + 1, E) under a float mask (O(L * (w + block))). Each result is merged in
    place into the output rows by log-sum-exp: no repeated KV heads, no full-size temporary."""
    B, H, Lq, _ = q_near.shape
    offset = k_near.shape[2] - Lq
    if not _fused_cpu(q_near, value) or offset < 0 or H % k_near.shape[1] or min(window, block_size, far_block or 1) < 1:
        raise ValueError(f"banded_causal needs CPU tensors with dv == d, Lk >= Lq, Hkv dividing H, window, block_size and far_block "
                         f">= 1; got q {tuple(q_near.shape)} on {q_near.device}, k {tuple(k_near.shape)}, v {tuple(value.shape)}, "
                         f"window={window}, block_size={block_size}, far_block={far_block}")
    if far_block is None:  # whole near blocks per chunk
        far_block = -(-max(FAR_MIN_ROWS, -(-Lq // FAR_CHUNKS)) // block_size) * block_size
    out = value.new_empty(B, H, Lq, value.shape[-1])
    lse = torch.empty(B, H, Lq, device=value.device)
    q0 = min(Lq, max(0, window - offset))  # queries before q0 have no far key
    band = _band_mask(min(block_size, Lq), window, q_near.dtype)
    for c in range(0, Lq, far_block):
        end = min(c + far_block, Lq)
        if max(c, q0) < end:
            _far_chunk(q_far, k_far, value, max(c, q0), end, offset, window, scaling, out, lse)
        for s in range(c, end, block_size):
            _near_block(q_near, k_near, value, s, min(s + block_size, end), offset, window, scaling, q0, out, lse, band)
    return out.transpose(1, 2)


def _far_chunk(q_far, k_far, value, s: int, e: int, offset: int, window: int, scaling: float, out, lse) -> None:
    """Far part of query rows [s, e) (each has a far key) into ``out`` / ``lse``: the causal square
    first, then the keys every row sees as far, merged in place (one chunk-sized temporary at a time)."""
    first, stop = s + offset - window, e + offset - window
    o, l = _flash(q_far[:, :, s:e], k_far[:, :, first:stop], value[:, :, first:stop], None, True, scaling)
    out[:, :, s:e], lse[:, :, s:e] = o, l
    del o
    if first > 0:
        o, l = _flash(q_far[:, :, s:e], k_far[:, :, :first], value[:, :, :first], None, False, scaling)
        merge(o, l, out[:, :, s:e], lse[:, :, s:e], out=out[:, :, s:e])
        torch.logaddexp(l, lse[:, :, s:e], out=lse[:, :, s:e])


def _near_block(q_near, k_near, value, s: int, e: int, offset: int, window: int, scaling: float, q0: int,
                out, lse, band: torch.Tensor) -> None:
    """Near part of query rows [s, e) over the band [S - w + 1, E) (``band`` masks it, cut to the
    keys that exist); rows from ``q0`` on merge with the far part already in ``out``, rows before it
    are the near result alone."""
    S, E = s + offset, e + offset
    lo = max(0, S - window + 1)
    cut = lo - (S - window + 1)
    mask = band[..., : e - s, cut:cut + E - lo]
    o_n, l_n = _flash(q_near[:, :, s:e], k_near[:, :, lo:E], value[:, :, lo:E], mask, False, scaling)
    split = min(max(q0, s), e)
    if split > s:
        out[:, :, s:split] = o_n[:, :, : split - s]
    if split < e:
        merge(o_n[:, :, split - s:], l_n[:, :, split - s:], out[:, :, split:e], lse[:, :, split:e], out=out[:, :, split:e])


def _band_mask(rows: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, rows, window + rows - 1) additive mask of a near block: query r sees the keys
    t in [r, r + window) (its key index minus window + 1 up to its own)."""
    rel = torch.arange(rows)[:, None] + window - 1 - torch.arange(window + rows - 1)[None]
    return _additive(((rel >= 0) & (rel < window))[None, None], dtype)


def _flash(q, k, v, mask, causal: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash kernel: (out, lse); every row must see at least one key."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scaling)


def _far_square(q_far, kf, v, window: int, offset: int, scaling: float, plain: bool, heads: torch.Tensor) -> torch.Tensor | None:
    """With aligned positions and no padding mask, every query's far keys [0, i + offset - window]
    form one shifted causal square (or one query seeing all of its far keys): one SDPA call written
    into ``heads`` (B, H, Lq, dv); returns its lse, or None when the blocks must do the far part."""
    Lq = q_far.shape[2]
    n_far = Lq + offset - window
    if not plain or not (n_far <= Lq or Lq == 1):
        return None
    lse_far = torch.full(q_far.shape[:3], float("-inf"), device=v.device)
    q0 = min(Lq, max(0, Lq - n_far))  # queries before q0 have no far key
    heads[:, :, :q0].zero_()
    if q0 < Lq:
        heads[:, :, q0:], lse_far[:, :, q0:] = sdpa_lse(q_far[:, :, q0:], kf[:, :, :n_far], v[:, :, :n_far], None, n_far <= Lq, scaling)
    return lse_far


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
