"""Plain torch rotary: the same signature and the same numbers as the Triton kernel, on any device.

RoFormer (Su et al. 2021, arXiv 2104.09864) eq. 34, applied to the pairs (x1_i, x2_i) of the first
r dims of each head, with c_i = cos(m theta_i), s_i = sin(m theta_i):
    x1' = x1 c - x2 s,    x2' = x2 c + x1 s        (conjugate=True rotates by -theta: s -> -s)
Layout "half" (HF / GPT-NeoX): x1 = x[:r/2], x2 = x[r/2:r]; "interleaved" (GPT-J): x1 = x[0:r:2],
x2 = x[1:r:2]. Pair i uses table column i (i < r/2): HF tables of width r repeat their halves
(emb = cat(freqs, freqs)), flash-attn tables have width r/2; both are read the same way.
Dims past r pass through. Arithmetic is float32 (float64 for float64 input, which only this path
takes), rounded once to the input dtype, as in the kernel.

Row t of sequence b is rotated to position p = t + offset_b; with ``cu_seqlens`` (packed sequences,
batch 1) p = t - cu_seqlens[n] + offset_n for the sequence n holding token t. A position outside the
table [0, table_len) (or a token past cu_seqlens[-1]) is left unrotated: the kernel never reads out
of bounds, and this path agrees with it.
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
    cos: torch.Tensor, sin: torch.Tensor, half: int, pos: torch.Tensor | int, seqlen: int, narrow: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (float64 for float64 tables) (1|B, T, half) cos/sin rows for positions ``pos``
    (identity rotation outside the table); with ``narrow=False`` the rows keep the tables' width,
    of which only the first ``half`` columns are meant."""
    work = torch.promote_types(cos.dtype, torch.float32)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if narrow and cos.shape[-1] != half:
        cos, sin = cos.narrow(-1, 0, half), sin.narrow(-1, 0, half)
    table_len = cos.shape[1]
    if isinstance(pos, int):
        if pos >= 0 and pos + seqlen <= table_len:
            if pos != 0 or seqlen != table_len:
                cos, sin = cos.narrow(1, pos, seqlen), sin.narrow(1, pos, seqlen)
            return (cos, sin) if cos.dtype == work else (cos.to(work), sin.to(work))
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


CHUNK = 1 << 18  # elements per float32 work buffer on the low-precision / in-place path


def _rotate_pairs(xv: torch.Tensor, acc: torch.Tensor, c: torch.Tensor, s: torch.Tensor, pair: int, sign: float) -> None:
    """acc = the rotated pairs of xv (float32 arithmetic): x1 c + sign x2 s, x2 c - sign x1 s."""
    torch.mul(xv, c, out=acc)
    a1, a2 = acc.unbind(pair)
    x1, x2 = xv.unbind(pair)
    a1.addcmul_(x2, s, value=sign)
    a2.addcmul_(x1, s, value=-sign)


def _rotate_one(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, r: int, interleaved: bool, conjugate: bool,
                inplace: bool, seq_axis: int) -> torch.Tensor:
    """x' for one tensor. c broadcasts against the (half, 2) / (2, half) pair view of x[..., :r], s
    against one member of the pairs; both float32. float32 out of place writes straight into the
    output; otherwise chunks along the sequence go through small float32 buffers (upcast once,
    round once), which keeps temporaries in cache."""
    shape = (*x.shape[:-1], r // 2, 2) if interleaved else (*x.shape[:-1], 2, r // 2)
    pair = -1 if interleaved else -2
    sign = 1.0 if conjugate else -1.0
    xv = (x if r == x.shape[-1] else x[..., :r]).view(shape)
    out = x if inplace else torch.empty_like(x)
    ov = (out if r == x.shape[-1] else out[..., :r]).view(shape)
    work = torch.promote_types(x.dtype, torch.float32)
    if x.dtype == work and not inplace:
        _rotate_pairs(xv, ov, c, s, pair, sign)
    else:
        seqlen = x.shape[seq_axis]
        step = max(1, min(seqlen, CHUNK // max(1, x.numel() // seqlen)))
        buf_shape = list(shape)
        buf_shape[seq_axis] = step
        xbuf, acc = (torch.empty(buf_shape, dtype=work, device=x.device) for _ in range(2))
        for t0 in range(0, seqlen, step):
            n = min(step, seqlen - t0)
            xf, af = xbuf.narrow(seq_axis, 0, n), acc.narrow(seq_axis, 0, n)
            xf.copy_(xv.narrow(seq_axis, t0, n))
            cs = c if c.shape[seq_axis] == 1 else c.narrow(seq_axis, t0, n)
            ss = s if s.shape[seq_axis] == 1 else s.narrow(seq_axis, t0, n)
            _rotate_pairs(xf, af, cs, ss, pair, sign)
            ov.narrow(seq_axis, t0, n).copy_(af)
    if not inplace and r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


SMALL = 1 << 17  # q + k elements up to which the few-calls path is used (decoding is call-bound)


def _rotate_small(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor, interleaved: bool, conjugate: bool,
                  seq_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k in one pass, in as few calls as possible (decoding is bound by calls, not bytes):
    x' = x c + swap(x) (-+ s), the float32 products and sums of ``_rotate_pairs``, so the results
    are identical; swap exchanges the members of each pair (an index_select: faster than flip)."""
    head_axis = 2 if seq_first else 1
    x = torch.cat((q, k), head_axis)
    if x.dtype != c.dtype:
        x = x.to(c.dtype)
    half = x.shape[-1] // 2
    pair = -1 if interleaved else -2
    xv = x.view((*x.shape[:-1], half, 2) if interleaved else (*x.shape[:-1], 2, half))
    signs, swap = _pair_constants(interleaved, conjugate, s.device)
    out = torch.mul(xv, _pair_view(c, half, interleaved, seq_first))
    out.addcmul_(xv.index_select(pair, swap), _pair_view(s, half, interleaved, seq_first) * signs)
    out = out.view(x.shape)
    return (out if out.dtype == q.dtype else out.to(q.dtype)).split_with_sizes([q.shape[head_axis], k.shape[head_axis]], head_axis)


def _pair_view(table: torch.Tensor, half: int, interleaved: bool, seq_first: bool) -> torch.Tensor:
    """The first ``half`` columns of (1|B, T, w) rows as one view that broadcasts against the pair
    view of x: (b, 1, T, 1, half) ((b, 1, T, half, 1) interleaved; heads and T swapped for bthd)."""
    b, t, _ = table.shape
    sb, st, sc = table.stride()
    shape, stride = [b, 1, t, 1, half], [sb, 0, st, 0, sc]
    if interleaved:
        shape[3:], stride[3:] = shape[:2:-1], stride[:2:-1]
    if seq_first:
        shape[1:3], stride[1:3] = shape[2:0:-1], stride[2:0:-1]
    return table.as_strided(shape, stride, table.storage_offset())


_PAIR_CONSTANTS: dict[tuple[bool, bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _pair_constants(interleaved: bool, conjugate: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (-1, 1) over the members of a pair ((1, -1) for the conjugate rotation), shaped for the
    pair view, and the index (1, 0) that swaps the members; cached per device."""
    key = (interleaved, conjugate, device)
    constants = _PAIR_CONSTANTS.get(key)
    if constants is None:
        signs = torch.tensor([1.0, -1.0] if conjugate else [-1.0, 1.0], device=device).view((2,) if interleaved else (2, 1))
        constants = _PAIR_CONSTANTS[key] = (signs, torch.tensor([1, 0], device=device))
    return constants


def rotary_torch(
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotate q and k ((B, H, T, d), or (B, T, H, d) with ``seq_first``) by cos/sin (1|B, Tc, w).

    Arguments are assumed valid (``rope_ext.kernels.rotary_apply.check_args`` checks them)."""
    x0 = q if q is not None else k
    seqlen = x0.shape[1] if seq_first else x0.shape[2]
    pos = positions(seqlen, offsets, cu_seqlens, x0.device)
    if q is not None and k is not None and not inplace and rotary_dim == x0.shape[-1] and q.numel() + k.numel() <= SMALL:
        c, s = gather_tables(cos, sin, rotary_dim // 2, pos, seqlen, narrow=False)
        return _rotate_small(q, k, c, s, interleaved, conjugate, seq_first)
    c, s = gather_tables(cos, sin, rotary_dim // 2, pos, seqlen)
    head_axis = 2 if seq_first else 1
    c, s = c.unsqueeze(head_axis), s.unsqueeze(head_axis)
    c = c.unsqueeze(-1 if interleaved else -2)
    seq_axis = 1 if seq_first else 2
    return tuple(None if x is None else _rotate_one(x, c, s, rotary_dim, interleaved, conjugate, inplace, seq_axis) for x in (q, k))
