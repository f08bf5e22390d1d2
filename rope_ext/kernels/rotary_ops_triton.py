"""The Triton rotary op: q and k rotated in one launch, each cos/sin row read once per program.

Same formula, arguments and numbers as the torch op (``rotary_ops_torch``, see its docstring) with
rounding="once", the only rounding this op has. Rotary embedding is memory-bound: the floor is
reading q, k and the tables once and writing q and k once. The grid is
(blocks of BLOCK_T tokens, batch, head groups); a program loads the float32 cos/sin tile of its
tokens once and loops over its share of q heads and of k heads, so the tables cost one read per
program instead of one per head. Positions (offsets, packed sequences) are computed in the kernel,
so the launch never synchronises with the device; launch decisions are cached per shape. Arithmetic
is float32 with FMA contraction on (stated explicitly: Triton 3.10 changes the default).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_tile(x_ptr, o_ptr, rows_x, rows_o, tmask, c, s,
                 BLOCK_T: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, REST: tl.constexpr,
                 REST_PAD: tl.constexpr, INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, COPY_REST: tl.constexpr):
    if CONJ:
        s = -s
    if INTERLEAVED:
        j = tl.arange(0, 2 * HALF_PAD)[None, :]
        m = tmask[:, None] & (j < 2 * HALF)
        x = tl.load(x_ptr + rows_x + j, mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, HALF_PAD, 2]))
        o = tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), [BLOCK_T, 2 * HALF_PAD])
        tl.store(o_ptr + rows_o + j, o.to(o_ptr.dtype.element_ty), mask=m)
    else:
        i = tl.arange(0, HALF_PAD)[None, :]
        m = tmask[:, None] & (i < HALF)
        x1 = tl.load(x_ptr + rows_x + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + rows_x + HALF + i, mask=m, other=0.0).to(tl.float32)
        tl.store(o_ptr + rows_o + i, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=m)
        tl.store(o_ptr + rows_o + HALF + i, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=m)
    if COPY_REST:
        j = tl.arange(0, REST_PAD)[None, :]
        m = tmask[:, None] & (j < REST)
        tl.store(o_ptr + rows_o + 2 * HALF + j, tl.load(x_ptr + rows_x + 2 * HALF + j, mask=m), mask=m)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, oq_ptr, ok_ptr, cos_ptr, sin_ptr, off_ptr, cu_ptr,
    T, HQ, HK, q_per_prog, k_per_prog, offset, n_seqs, table_len,
    sqb, sqh, sqt, skb, skh, skt, soqb, soqh, soqt, sokb, sokh, sokt, scb, sct,
    BLOCK_T: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, REST: tl.constexpr, REST_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, COPY_REST: tl.constexpr, OFFSET_TENSOR: tl.constexpr,
    VARLEN: tl.constexpr, CU_CHUNK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_g = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    if VARLEN:
        seq = tl.zeros([BLOCK_T], dtype=tl.int32)
        for c0 in range(0, n_seqs, CU_CHUNK):
            j = c0 + tl.arange(0, CU_CHUNK)
            ends = tl.load(cu_ptr + 1 + j, mask=j < n_seqs, other=2147483647).to(tl.int32)
            seq += tl.sum((ends[None, :] <= t[:, None]).to(tl.int32), axis=1)
        inside = tmask & (seq < n_seqs)
        pos = t - tl.load(cu_ptr + seq, mask=inside, other=0).to(tl.int32)
        if OFFSET_TENSOR:
            pos += tl.load(off_ptr + seq, mask=inside, other=0).to(tl.int32)
        else:
            pos += offset
        pos = tl.where(inside, pos, -1)
    else:
        if OFFSET_TENSOR:
            pos = t + tl.load(off_ptr + pid_b).to(tl.int32)
        else:
            pos = t + offset
    valid = tmask & (pos >= 0) & (pos < table_len)
    i = tl.arange(0, HALF_PAD)[None, :]
    tab = pid_b * scb + pos.to(tl.int64)[:, None] * sct + i
    tm = valid[:, None] & (i < HALF)
    c = tl.load(cos_ptr + tab, mask=tm, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + tab, mask=tm, other=0.0).to(tl.float32)
    t64 = t.to(tl.int64)[:, None]
    h0 = pid_g * q_per_prog
    for h in range(h0, tl.minimum(h0 + q_per_prog, HQ)):
        _rotate_tile(q_ptr, oq_ptr, pid_b * sqb + h * sqh + t64 * sqt, pid_b * soqb + h * soqh + t64 * soqt, tmask, c, s,
                     BLOCK_T, HALF, HALF_PAD, REST, REST_PAD, INTERLEAVED, CONJ, COPY_REST)
    h0 = pid_g * k_per_prog
    for h in range(h0, tl.minimum(h0 + k_per_prog, HK)):
        _rotate_tile(k_ptr, ok_ptr, pid_b * skb + h * skh + t64 * skt, pid_b * sokb + h * sokh + t64 * sokt, tmask, c, s,
                     BLOCK_T, HALF, HALF_PAD, REST, REST_PAD, INTERLEAVED, CONJ, COPY_REST)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _plan(batch: int, seqlen: int, hq: int, hk: int, half: int, rest: int, device: torch.device) -> tuple:
    """(grid, q heads per program, k heads per program, BLOCK_T, HALF_PAD, REST_PAD, num_warps).

    Tiles of about 4096 elements per head; enough head groups for ~4 waves of programs on the
    device, so decode shapes (T = 1) still spread over the SMs."""
    half_pad = triton.next_power_of_2(half)
    block_t = max(1, min(4096 // (2 * half_pad), triton.next_power_of_2(seqlen)))
    t_blocks = triton.cdiv(seqlen, block_t)
    heads = max(hq, hk, 1)
    groups = max(1, min(heads, triton.cdiv(4 * _sm_count(device), t_blocks * batch)))
    q_per, k_per = triton.cdiv(hq, groups), triton.cdiv(hk, groups)
    tile = block_t * 2 * half_pad
    num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8
    rest_pad = triton.next_power_of_2(rest) if rest else 1
    return (t_blocks, batch, groups), q_per, k_per, block_t, half_pad, rest_pad, num_warps


def _bht_strides(x: torch.Tensor | None, seq_first: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of x, or zeros when absent."""
    if x is None:
        return 0, 0, 0
    st = x.stride()
    return (st[0], st[2], st[1]) if seq_first else (st[0], st[1], st[2])


def rotary_op(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool = False,
    offsets: int | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    conjugate: bool = False,
    inplace: bool = False,
    seq_first: bool = False,
    rounding: str = "once",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The Triton twin of ``rotary_ops_torch.rotary_op`` (same arguments, assumed valid: last dims
    contiguous, ``rounding`` "once")."""
    x0 = q if q is not None else k
    if seq_first:
        batch, seqlen, _, d = x0.shape
    else:
        batch, _, seqlen, d = x0.shape
    hi = 2 if seq_first else 1
    hq = 0 if q is None else q.shape[hi]
    hk = 0 if k is None else k.shape[hi]
    oq = q if (inplace or q is None) else torch.empty_like(q)
    ok = k if (inplace or k is None) else torch.empty_like(k)
    half, rest = rotary_dim // 2, d - rotary_dim
    grid, q_per, k_per, block_t, half_pad, rest_pad, num_warps = _plan(batch, seqlen, hq, hk, half, rest, x0.device)
    qs, ks, oqs, oks = (_bht_strides(x, seq_first) for x in (q, k, oq, ok))
    offset_tensor = isinstance(offsets, torch.Tensor)
    cst = cos.stride()
    scb, sct = (0, cst[0]) if cos.dim() == 2 else ((cst[0] if cos.shape[0] > 1 else 0), cst[1])
    _rotary_kernel[grid](
        x0 if q is None else q, x0 if k is None else k, x0 if oq is None else oq, x0 if ok is None else ok,
        cos, sin, offsets if offset_tensor else cos, cos if cu_seqlens is None else cu_seqlens,
        seqlen, hq, hk, q_per, k_per, 0 if offset_tensor or offsets is None else offsets,
        0 if cu_seqlens is None else cu_seqlens.shape[0] - 1, cos.shape[-2],
        *qs, *ks, *oqs, *oks, scb, sct,
        BLOCK_T=block_t, HALF=half, HALF_PAD=half_pad, REST=rest, REST_PAD=rest_pad,
        INTERLEAVED=interleaved, CONJ=conjugate, COPY_REST=(rest > 0 and not inplace),
        OFFSET_TENSOR=offset_tensor, VARLEN=cu_seqlens is not None, CU_CHUNK=64, num_warps=num_warps,
        enable_fp_fusion=True,
    )
    return oq, ok
