"""Dilated attention (Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens", sec. 2.2-2.4).

For each pair (segment length w_i, dilation r_i) the sequence is cut into segments of w_i positions;
inside a segment head h keeps the rows whose position p has p mod r_i = h mod r_i (the paper's offset
s_j = j mod r for head j) and attends causally among them. The pairs' outputs O_i are combined by
their softmax denominators s_i (eq. 10-11):

    O = sum_i alpha_i O_i,   alpha_i = s_i / sum_j s_j,

so a pair that does not cover a query (its lse is -inf) gets weight 0. This equals one softmax over
the multiset of (pair, key) entries: attention with the additive bias log c_ij, where c_ij counts the
pairs in which query i sees key j (``dilated_multiplicity``).

q and k are rotated with plain RoPE at their true positions before gathering, so distances stay
true: dilated attention cuts the cost (O(N sum_i w_i / r_i^2 d) instead of O(N^2 d)), it does not by
itself extend the position range -- keys farther than the trained length are still rotated by
distances the model never saw. Segments are cut at the sequence end. Segments and offsets follow
positions, not rows of the batch, so left padding changes no real token. A query at position p --
decoding with a KV cache included -- sees in pair (w, r), for head h, the keys at positions
p' <= p with floor(p' / w) = floor(p / w) and p' = p = h (mod r): the rows it is gathered with in a
full forward, so cached generation equals recomputing the sequence.

Two paths, equal to float rounding: unpadded prefill and training (positions 0 .. L-1, no mask, no
softcap) gather each pair's dilated rows and call SDPA on them (the log-sum-exp merge of
``rope_ext.kernels.two_part_merged``), with an autograd Function whose backward replays the SDPA
backward per pair with the combined output and log-sum-exp (the blockwise-attention identity), so
memory stays O(N d); everything else (padding, decoding with a KV cache, sliding windows, softcap)
is query-blocked attention with the log c_ij bias over the keys a block can see.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.two_part_merged import merge, sdpa_lse
from ..validate import MAX_COUNT, integer
from .base import Method, RopeSpec, check_target_length
from .context import AttentionContext
from .registry import register

BLOCK = 256  # queries per block of the masked path


def dilated_multiplicity(q_pos: torch.Tensor, k_pos: torch.Tensor, heads: torch.Tensor, segments: Sequence[int],
                         dilations: Sequence[int]) -> torch.Tensor:
    """c_ij per head: in how many pairs (w, r) query position i sees key position j (LongNet eq. 5-9:
    same segment floor(i / w) = floor(j / w), both kept rows i = j = h mod r (mod r), j <= i).
    Broadcasting shapes: q_pos (..., Lq, 1), k_pos (..., 1, Lk), heads (..., H, 1, 1)."""
    count = torch.zeros((), dtype=torch.int32, device=q_pos.device)
    for w, r in zip(segments, dilations):
        offset = heads % r
        count = count + ((torch.div(q_pos, w, rounding_mode="floor") == torch.div(k_pos, w, rounding_mode="floor"))
                         & (q_pos % r == offset) & (k_pos % r == offset)).to(torch.int32)
    return count * (k_pos <= q_pos)


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      segments: Sequence[int], dilations: Sequence[int], allowed: torch.Tensor | None, scaling: float,
                      softcap: float | None = None) -> torch.Tensor:
    """Multi-head dilated attention of (already rotated) q (B, H, Lq, d) over k, v (B, Hkv, Lk, d),
    the queries being the last Lq keys; ``allowed``: bool mask broadcastable to (B, H, Lq, Lk) or None
    (causal). Returns (B, Lq, H, dv)."""
    L = q.shape[2]
    steps = torch.arange(L, device=q_pos.device)
    plain = (allowed is None and softcap is None and k.shape[2] == L and v.shape[-1] == q.shape[-1]
             and torch.equal(q_pos, steps.expand_as(q_pos)) and torch.equal(k_pos, q_pos))
    if plain:
        out = DilatedFunction.apply(q, k, v, tuple(segments), tuple(dilations), scaling)
    else:
        out = _masked(q, k, v, q_pos, k_pos, segments, dilations, allowed, scaling, softcap)
    return out.transpose(1, 2).contiguous()


def _masked(q, k, v, q_pos, k_pos, segments, dilations, allowed, scaling, softcap) -> torch.Tensor:
    """Query blocks over all keys before them, with the additive bias log c_ij (0 -> -inf); rows that
    see no key give 0. Differentiable by autograd."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    group = H // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    heads = torch.arange(H, device=q.device)[None, :, None, None]
    outs = []
    for start in range(0, Lq, BLOCK):
        end = min(start + BLOCK, Lq)
        stop = end + Lk - Lq
        count = dilated_multiplicity(q_pos[:, None, start:end, None], k_pos[:, None, None, :stop], heads, segments, dilations)
        if allowed is not None:
            count = count * allowed[..., start:end, :stop]
        scores = torch.matmul(q[:, :, start:end].float(), k[:, :, :stop].float().transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        empty = (count == 0).all(dim=-1, keepdim=True)
        scores = (scores + count.float().log()).masked_fill(empty, 0.0)
        p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
        outs.append(torch.matmul(p, v[:, :, :stop].float()).to(v.dtype))
    return torch.cat(outs, dim=2)


def _chunks(L: int, w: int, r: int) -> Iterator[tuple[int, int, int]]:
    """(start, number of segments, segment rows) of the whole segments of w rows, then of the last,
    cut one padded up to a multiple of r (its padded rows come after every real row: no real query
    sees them)."""
    if L // w:
        yield 0, L // w, w
    if L % w:
        yield L // w * w, 1, -(-(L % w) // r) * r


def _views(L: int, segments: tuple[int, ...], dilations: tuple[int, ...], H: int, group: int, device: torch.device):
    """Every (start, n segments, segment rows, r, offset o, query heads h = o mod r as a slice, their
    KV heads: a slice or an index)."""
    for w, r in zip(segments, dilations):
        for start, n, seg in _chunks(L, w, r):
            for o in range(min(r, H)):
                heads = slice(o, H, r)
                kv = heads if group == 1 else torch.arange(o, H, r, device=device) // group
                yield start, n, seg, r, o, heads, kv


def _rows(x: torch.Tensor, start: int, n: int, seg: int, r: int, o: int) -> torch.Tensor:
    """View (B, H, n, seg // r, ...) of rows start + o, start + o + r, ... of n segments of ``seg``
    rows of x (B, H, L_padded, ...)."""
    part = x[:, :, start:start + n * seg]
    return part.reshape(*part.shape[:2], n, seg // r, r, *part.shape[3:])[:, :, :, :, o]


def _pick(x: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
    return x[:, heads] if isinstance(heads, slice) else x.index_select(1, heads)


def _compress(x: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
    """(B, H, n, m, ...) rows of the chosen heads -> (B, Hs * n, m, ...), one SDPA batch entry per segment."""
    x = _pick(x, heads)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (B, H, L, ...) with zero rows appended up to ``rows`` (x itself when L = rows)."""
    if x.shape[2] == rows:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:2], rows - x.shape[2], *x.shape[3:])], dim=2)


def _padded_rows(L: int, segments: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """Rows the chunks of every pair span: L plus the padding of the longest cut segment."""
    return max(start + n * seg for w, r in zip(segments, dilations) for start, n, seg in _chunks(L, w, r))


def _forward(q, k, v, segments, dilations, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined output (B, H, L, d) float32, combined lse (B, H, L)) from one SDPA per pair, chunk
    and head offset, merged by log-sum-exp in place (strided views of the padded buffers)."""
    B, H, L, _ = q.shape
    rows = _padded_rows(L, segments, dilations)
    q, k, v = (_padded(t, rows) for t in (q, k, v))
    out = torch.zeros(B, H, rows, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, rows), float("-inf"), dtype=torch.float32, device=q.device)
    for start, n, seg, r, o, heads, kv in _views(L, segments, dilations, H, H // k.shape[1], q.device):
        o_c, l_c = sdpa_lse(_compress(_rows(q, start, n, seg, r, o), heads), _compress(_rows(k, start, n, seg, r, o), kv),
                            _compress(_rows(v, start, n, seg, r, o), kv), None, True, scaling)
        o_old, l_old = _rows(out, start, n, seg, r, o)[:, heads], _rows(lse, start, n, seg, r, o)[:, heads]
        l_new = l_c.reshape(l_old.shape).float()
        merge(o_old, l_old, o_c.reshape(o_old.shape), l_new, out=o_old)
        torch.logaddexp(l_old, l_new, out=l_old)
    return out[:, :, :L], lse[:, :, :L]


def pair_backward_flash(dout, q, k, v, out, lse, scaling):
    """Gradients of one causal SDPA call whose softmax is part of a larger one: torch's CPU flash
    backward given the combined output and log-sum-exp (P = exp(S - lse), dS = P (dO V^T - rowsum(dO O)))."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, True, scale=scaling)


def pair_backward_eager(dout, q, k, v, out, lse, scaling):
    """The same gradients from explicit matrices (any device): P = exp(S - lse) on the causal
    square, dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = dS K s, dK = dS^T Q s."""
    qf, kf, vf, dof, of = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q, k, v, dout, out))
    m = q.shape[2]
    causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scaling
    p = torch.exp(s - lse.to(s.dtype)[..., None]).masked_fill(~causal, 0.0)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - (dof * of).sum(-1, keepdim=True))
    grads = (torch.matmul(ds, kf) * scaling, torch.matmul(ds.transpose(-1, -2), qf) * scaling,
             torch.matmul(p.transpose(-1, -2), dof))
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


class DilatedFunction(torch.autograd.Function):
    """Dilated attention over (B, H, L, d) q and (B, Hkv, L, d) k, v at positions 0 .. L-1; output
    (B, H, L, d). Backward: per pair, the SDPA backward with the combined output and lse."""

    @staticmethod
    def forward(ctx: Any, q, k, v, segments, dilations, scaling):
        out, lse = _forward(q, k, v, segments, dilations, scaling)
        out = out.to(v.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (segments, dilations, scaling)
        return out

    @staticmethod
    def backward(ctx: Any, dout):
        segments, dilations, scaling = ctx.setup
        B, H, L, _ = dout.shape
        rows = _padded_rows(L, segments, dilations)
        q, k, v, out, lse = (_padded(t, rows) for t in ctx.saved_tensors)
        dout = _padded(dout.to(q.dtype), rows)
        lse = lse.to(q.dtype) if q.dtype == torch.float64 else lse
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                      for t in (q, k, v))
        backward = pair_backward_flash if q.device.type == "cpu" else pair_backward_eager
        for start, n, seg, r, o, heads, kv in _views(L, segments, dilations, H, H // k.shape[1], q.device):
            qs = [_compress(_rows(t, start, n, seg, r, o), heads) for t in (dout, q, out, lse)]
            kc, vc = (_compress(_rows(t, start, n, seg, r, o), kv) for t in (k, v))
            gq, gk, gv = backward(qs[0], qs[1], kc, vc, qs[2], qs[3], scaling)
            target = _rows(dq, start, n, seg, r, o)[:, heads]
            target += gq.reshape(target.shape)
            for grad, g in ((dk, gk), (dv, gv)):
                target = _rows(grad, start, n, seg, r, o)
                g = g.reshape(B, -1, *target.shape[2:]).to(grad.dtype)
                if isinstance(kv, slice):
                    target[:, kv] += g
                else:
                    target.index_add_(1, kv, g)
        return dq[:, :, :L].to(q.dtype), dk[:, :, :L].to(k.dtype), dv[:, :, :L].to(v.dtype), None, None, None


def _int_tuple(method: Method, field: str) -> tuple[int, ...]:
    value = getattr(method, field)
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{method.name}: {field} must be a non-empty tuple of ints, got {value!r}")
    return tuple(integer(x, f"{method.name}: {field}[{i}]", minimum=1, maximum=MAX_COUNT) for i, x in enumerate(value))


@register("dilated")
@dataclass(frozen=True, kw_only=True)
class Dilated(Method):
    """LongNet's dilated attention over plain RoPE at true positions (cost, not position range)."""

    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "deferred"
    summary: ClassVar[str] = "LongNet dilated attention: segments w_i, every r_i-th row per head, merged by softmax denominators"
    reference: ClassVar[str] = "Ding et al. 2023, LongNet: Scaling Transformers to 1,000,000,000 Tokens"
    segments: tuple[int, ...]
    dilations: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        segments, dilations = _int_tuple(self, "segments"), _int_tuple(self, "dilations")
        if len(segments) != len(dilations):
            raise ValueError(f"dilated: segments {segments} and dilations {dilations} must have the same length "
                             f"(one dilation per segment)")
        if any(a >= b for a, b in zip(segments, segments[1:])):
            raise ValueError(f"dilated: segments must be strictly ascending (LongNet's geometric w_i), got {segments}")
        if any(a > b for a, b in zip(dilations, dilations[1:])):
            raise ValueError(f"dilated: dilations must be ascending (LongNet's geometric r_i), got {dilations}")
        if dilations[0] != 1:
            raise ValueError(f"dilated: the first dilation must be 1 (every token then sees its own segment densely); "
                             f"got dilations {dilations}")
        for w, r in zip(segments, dilations):
            if w % r:
                raise ValueError(f"dilated: segment {w} is not divisible by its dilation {r}; each segment must be a "
                                 f"multiple of its dilation")
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "dilations", dilations)

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """LongNet's geometric pairs from the trained length L0: w_i = L0 2^i, r_i = 2^i, up to the
        first w_i >= length (each head's compressed segment holds L0 rows). Within the trained length
        this is one dense pair (L0, 1): plain causal attention."""
        check_target_length(cls, length)
        params = dict(given)
        if "segments" not in params and "dilations" not in params:
            w = params.get("original_max_position_embeddings") or spec.trained_length
            segments, dilations = [w], [1]
            while segments[-1] < length:
                segments.append(2 * segments[-1])
                dilations.append(2 * dilations[-1])
            params.update(segments=tuple(segments), dilations=tuple(dilations))
        return params

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k = ctx.rotate(query, ctx.q_pos, "q"), ctx.rotate(key, ctx.k_pos, "k")
        if self.dilations == (1,) and int(ctx.k_pos.max()) < self.segments[0]:
            return ctx.base(q, k, value)  # one dense segment: the model's own causal attention
        allowed = None if ctx.mask is None else ctx.allowed()
        return dilated_attention(q, k, value, ctx.q_pos, ctx.k_pos, self.segments, self.dilations, allowed,
                                 ctx.scaling, ctx.softcap)
