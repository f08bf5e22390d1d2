"""The torch rotary op: the same signature and the same numbers as the Triton op, on any device.

RoFormer (Su et al. 2021, arXiv 2104.09864) eq. 34, applied to the pairs (x1_i, x2_i) of the first
r dims of each head, with c_i = cos(m theta_i), s_i = sin(m theta_i):
    x1' = x1 c - x2 s,    x2' = x2 c + x1 s        (conjugate=True rotates by -theta: s -> -s)
Layout "half" (HF / GPT-NeoX): x1 = x[:r/2], x2 = x[r/2:r]; "interleaved" (GPT-J): x1 = x[0:r:2],
x2 = x[1:r:2]. Pair i uses table column i (i < r/2): HF tables of width r repeat their halves
(emb = cat(freqs, freqs)), flash-attn tables have width r/2; both are read the same way.
Dims past r pass through.

Two roundings, chosen by ``rounding`` (one function, one formula; only the rounding differs):
  * "once" (the default): float32 arithmetic (float64 for float64 input), rounded once to the
    input dtype -- the Triton and compiled ops' numbers to float32 rounding: x1 c - x2 s is an
    addcmul here, which a CPU with fused multiply-add computes as round(round(x1 c) - x2 s), the
    product x2 s unrounded; the compiled op rounds it (transformers' expression in float32), so
    the two differ by at most one float32 rounding of a product before the final rounding;
  * "each": the tables are taken in the input dtype and every product and sum is rounded to it,
    x1 c - x2 s as round(round(x1 c) - round(x2 s)) -- bitwise transformers'
    ``x * cos + rotate_half(x) * sin`` for tables whose halves are equal (HF's emb = cat(freqs,
    freqs), ``rope_ext.rotary.cos_sin``), in float32 and in bf16 / fp16 alike. Products and sums are
    separate calls (no addcmul), so no fused multiply-add can skip a rounding on any device.

Row t of sequence b is rotated to position p = t + offset_b; with ``cu_seqlens`` (packed sequences,
batch 1) p = t - cu_seqlens[n] + offset_n for the sequence n holding token t. A position outside the
table [0, table_len) (or a token past cu_seqlens[-1]) is left unrotated: the Triton op never reads
out of bounds, and this op agrees with it.
"""
from __future__ import annotations

import torch


def positions(seqlen: int, offsets: int | torch.Tensor | None, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor | int:
    """Table rows (1|B, T) for every token (-1: no sequence), or an int start when row t is start + t."""
    if cu_seqlens is None:
        if not isinstance(offsets, torch.Tensor):
            return offsets or 0
        if seqlen == 1:
            return offsets[:, None]
        return offsets[:, None] + torch.arange(seqlen, device=device, dtype=offsets.dtype)[None, :]
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    n = cu.numel() - 1
    t = torch.arange(seqlen, device=device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    inside = seq < n
    seq = seq.clamp(max=n - 1)
    pos = t - cu[seq]
    if offsets is not None:
        pos = pos + (offsets if isinstance(offsets, int) else offsets.to(device=device, dtype=torch.long)[seq])
    return torch.where(inside, pos, -1)[None, :]


def gather_tables(
    cos: torch.Tensor, sin: torch.Tensor, half: int, pos: torch.Tensor | int, seqlen: int, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1|B, T, w) cos/sin rows of dtype ``work`` for positions ``pos`` (identity rotation outside
    the table), of which the first ``half`` columns are meant: rows that are a slice of the tables
    stay views of them (w = the tables' width), gathered or converted rows are narrowed first."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    table_len = cos.shape[1]
    if isinstance(pos, int) and pos >= 0 and pos + seqlen <= table_len:
        if pos != 0 or seqlen != table_len:
            cos, sin = cos.narrow(1, pos, seqlen), sin.narrow(1, pos, seqlen)
        if cos.dtype == work:
            return cos, sin
        return cos.narrow(-1, 0, half).to(work), sin.narrow(-1, 0, half).to(work)
    if cos.shape[-1] != half:
        cos, sin = cos.narrow(-1, 0, half), sin.narrow(-1, 0, half)
    if isinstance(pos, int):
        pos = torch.arange(pos, pos + seqlen, device=cos.device)[None, :]
    in_table = None
    if pos.device.type == "cpu":  # no device to wait for: check once and skip the masking if all rows exist
        lo, hi = torch.aminmax(pos)
        in_table = int(lo) >= 0 and int(hi) < table_len
    rows = pos if in_table else pos.clamp(0, table_len - 1)
    if cos.shape[0] == 1:
        c, s = cos[0][rows], sin[0][rows]
    else:
        b = torch.arange(cos.shape[0], device=cos.device)[:, None]
        c, s = cos[b, rows.expand(cos.shape[0], -1)], sin[b, rows.expand(cos.shape[0], -1)]
    if in_table:
        return c.to(work), s.to(work)
    valid = ((pos >= 0) & (pos < table_len))[..., None]
    return torch.where(valid, c.to(work), 1.0), torch.where(valid, s.to(work), 0.0)


def pair_views(c: torch.Tensor, s: torch.Tensor, half: int, interleaved: bool, seq_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``half`` columns of (1|B, T, w) rows c and s as views that broadcast against the
    pair view of x (``x.unflatten(-1, (2, half))``, or ``(half, 2)`` interleaved): (b, 1, T, 1, half)
    ((b, 1, T, half, 1) interleaved; heads and T swapped for bthd)."""
    b, t, _ = c.shape
    sb, st, sc = c.stride()
    shape, stride = ((b, t, 1), (sb, st, 0)) if seq_first else ((b, 1, t), (sb, 0, st))
    shape, stride = (shape + (half, 1), stride + (sc, 0)) if interleaved else (shape + (1, half), stride + (0, sc))
    cv = c.as_strided(shape, stride, c.storage_offset())
    if s.stride() == c.stride():
        return cv, s.as_strided(shape, stride, s.storage_offset())
    return cv, pair_views(s, s, half, interleaved, seq_first)[0]


CHUNK = 1 << 18  # elements per work buffer on the low-precision / in-place path


def _members(t: torch.Tensor, r: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the first and of the second members of the pairs of t[..., :r]."""
    return (t[..., 0:r:2], t[..., 1:r:2]) if interleaved else (t[..., : r // 2], t[..., r // 2: r])


def _rotate_pairs(x: torch.Tensor, acc: torch.Tensor, c: torch.Tensor, s: torch.Tensor, r: int, interleaved: bool,
                  sign: float, each: bool) -> None:
    """acc[..., :r] = the rotated pairs of x[..., :r] in acc's dtype: x1 c + sign x2 s, x2 c - sign x1 s;
    with ``each`` the products x s are rounded before they are added (see the module doc)."""
    shape = (r // 2, 2) if interleaved else (2, r // 2)
    if r < x.shape[-1]:
        x, acc = x[..., :r], acc[..., :r]
    torch.mul(x.unflatten(-1, shape), c, out=acc.unflatten(-1, shape))
    (a1, a2), (x1, x2) = _members(acc, r, interleaved), _members(x, r, interleaved)
    if each:
        a1.add_(x2 * s, alpha=sign)
        a2.add_(x1 * s, alpha=-sign)
    else:
        a1.addcmul_(x2, s, value=sign)
        a2.addcmul_(x1, s, value=-sign)


def _rotate_one(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, r: int, interleaved: bool, conjugate: bool,
                inplace: bool, seq_axis: int, each: bool) -> torch.Tensor:
    """x' for one tensor; c is the ``pair_views`` view of the cos rows, s the sin rows as (b, 1, T,
    r/2) ((b, T, 1, r/2) for bthd), both of the working dtype. Out of place in the working dtype
    writes straight into the output; otherwise chunks along the sequence go through small buffers of
    the working dtype (upcast once, round once), which keeps temporaries in cache."""
    sign = 1.0 if conjugate else -1.0
    out = x if inplace else torch.empty_like(x)
    work = c.dtype
    if x.dtype == work and not inplace:
        _rotate_pairs(x, out, c, s, r, interleaved, sign, each)
    else:
        seqlen = x.shape[seq_axis]
        step = max(1, min(seqlen, CHUNK // max(1, x.numel() // seqlen)))
        buf_shape = [*x.shape[:-1], r]
        buf_shape[seq_axis] = step
        xbuf, acc = (torch.empty(buf_shape, dtype=work, device=x.device) for _ in range(2))
        x_rot, out_rot = (x, out) if r == x.shape[-1] else (x[..., :r], out[..., :r])
        for t0 in range(0, seqlen, step):
            n = min(step, seqlen - t0)
            xf, af = xbuf.narrow(seq_axis, 0, n), acc.narrow(seq_axis, 0, n)
            xf.copy_(x_rot.narrow(seq_axis, t0, n))
            cs = c if c.shape[seq_axis] == 1 else c.narrow(seq_axis, t0, n)
            ss = s if s.shape[seq_axis] == 1 else s.narrow(seq_axis, t0, n)
            _rotate_pairs(xf, af, cs, ss, r, interleaved, sign, each)
            out_rot.narrow(seq_axis, t0, n).copy_(af)
    if not inplace and r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


FEW_CALLS = 1 << 16  # elements below which ``rotate_hf`` takes transformers' own expression


def rotate_hf(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rounding="each"`` for HF tables (B, T, r) and x (B, H, T, d), the layout of the attention
    function's rotations: x * cos + rotate_half(x) * sin in x's dtype, each product and sum rounded
    once (bitwise transformers'). Small inputs take that expression (fewest calls: decoding is bound
    by calls); larger ones write x * cos once and subtract / add the half products in place (no
    negated copy, no concatenation); under autograd the expression (in-place writes would break it)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r, half = cos.shape[-1], cos.shape[-1] // 2
    if x.numel() < FEW_CALLS or (torch.is_grad_enabled() and x.requires_grad):
        x_rot = x if r == x.shape[-1] else x[..., :r]
        rotated = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1) * sin
        return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)
    out = torch.empty_like(x)
    x_rot, out_rot = (x, out) if r == x.shape[-1] else (x[..., :r], out[..., :r])
    torch.mul(x_rot, cos, out=out_rot)
    out_rot[..., :half].sub_(x_rot[..., half:] * sin[..., :half])
    out_rot[..., half:].add_(x_rot[..., :half] * sin[..., half:])
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


SMALL = 1 << 17  # q + k elements up to which the few-calls path is used (decoding is call-bound)


def _rotate_small(q: torch.Tensor | None, k: torch.Tensor | None, c: torch.Tensor, s: torch.Tensor, interleaved: bool,
                  conjugate: bool, seq_first: bool, each: bool, work: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """q and k (either may be None; every dim rotates) in one pass, in as few calls as possible
    (decoding is bound by calls, not bytes): x' = x c + swap(x) (-+ s), the products and sums of
    ``_rotate_pairs`` in the working dtype ``work`` (c and s are of it, or upcast exactly to it by
    the products), so the results are identical; swap exchanges the members of each pair (an
    index_select: faster than flip)."""
    head_axis = 2 if seq_first else 1
    x = q if k is None else k if q is None else torch.cat((q, k), head_axis)
    dtype = x.dtype
    if dtype != work:
        x = x.to(work)
    half = x.shape[-1] // 2
    pair = -1 if interleaved else -2
    xv = x.unflatten(-1, (half, 2) if interleaved else (2, half))
    signs, swap = _pair_constants(interleaved, conjugate, work, c.device)
    out = xv * c
    if each:
        out += xv.index_select(pair, swap) * (s * signs)
    else:
        out.addcmul_(xv.index_select(pair, swap), s * signs)
    out = out.flatten(-2)
    if out.dtype != dtype:
        out = out.to(dtype)
    if q is None or k is None:
        return (None, out) if q is None else (out, None)
    return out.split_with_sizes([q.shape[head_axis], k.shape[head_axis]], head_axis)


_PAIR_CONSTANTS: dict[tuple[bool, bool, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _pair_constants(interleaved: bool, conjugate: bool, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (-1, 1) of ``dtype`` over the members of a pair ((1, -1) for the conjugate rotation),
    shaped for the pair view, and the index (1, 0) that swaps the members; cached per dtype and device."""
    key = (interleaved, conjugate, dtype, device)
    constants = _PAIR_CONSTANTS.get(key)
    if constants is None:
        signs = torch.tensor([1.0, -1.0] if conjugate else [-1.0, 1.0], dtype=dtype, device=device).view((2,) if interleaved else (2, 1))
        constants = _PAIR_CONSTANTS[key] = (signs, torch.tensor([1, 0], device=device))
    return constants


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
    """Rotate q and k ((B, H, T, d), or (B, T, H, d) with ``seq_first``) by cos/sin (1|B, Tc, w).

    ``rounding``: "once" (float32 arithmetic, one rounding: the Triton and compiled ops' numbers
    to float32 rounding) or "each"
    (every product and sum rounded to the input dtype: bitwise transformers' rotation); see the
    module doc. Arguments are assumed valid (``rotary_autograd.check_args`` checks them)."""
    x0 = q if q is not None else k
    seqlen = x0.shape[1] if seq_first else x0.shape[2]
    each = rounding == "each"
    work = x0.dtype if each else torch.promote_types(torch.promote_types(x0.dtype, cos.dtype), torch.float32)
    half = rotary_dim // 2
    small = not inplace and rotary_dim == x0.shape[-1] and (0 if q is None else q.numel()) + (0 if k is None else k.numel()) <= SMALL
    # the few-calls path lets its products upcast tables that convert exactly (two calls fewer per table)
    rows = cos.dtype if small and torch.promote_types(cos.dtype, work) == work else work
    c, s = gather_tables(cos, sin, half, positions(seqlen, offsets, cu_seqlens, x0.device), seqlen, rows)
    c, s = pair_views(c, s, half, interleaved, seq_first)
    if small:
        return _rotate_small(q, k, c, s, interleaved, conjugate, seq_first, each, work)
    s, seq_axis = s.squeeze(-1 if interleaved else -2), 1 if seq_first else 2
    return tuple(None if x is None else _rotate_one(x, c, s, rotary_dim, interleaved, conjugate, inplace, seq_axis, each) for x in (q, k))
