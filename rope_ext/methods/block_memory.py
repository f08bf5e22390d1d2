"""Training-free block memory (InfLLM: Xiao et al. 2024, "InfLLM: Training-Free Long-Context
Extrapolation for LLMs with an Efficient Context Memory"; thunlp/InfLLM), exact per query.

For a query at position p, the keys it may attend split into
  * local keys (0 <= p - p_j < window): ordinary RoPE (InfLLM's local window, n_local);
  * far keys (p - p_j >= window), attended at ONE fixed distance ``window`` (the query rotated to
    position w, keys unrotated: InfLLM rotates its global queries to n_local, memory keys to 0):
      - initial tokens (p_j < init_tokens, InfLLM's n_init): always;
      - memory blocks: positions init_tokens + c * block_size .. + block_size - 1. A block wholly far
        for the query is a *candidate*; its score is the dot product of the lookup query (the sum of
        the row's last ``lookup_queries`` queries, the query itself included, padding as zero) with
        the block's representative (summed over heads, as InfLLM's default), and the ``topk`` best
        candidates are attended (InfLLM sec. 3.2: "memory lookup");
      - far keys of blocks not yet wholly far (InfLLM's "remainder"): always.
The two parts (local, far) are merged by log-sum-exp (``kernels.two_part_merged.merge``).

Where this differs from InfLLM, and why (cached decoding must equal a full recompute):
  * representative keys (InfLLM sec. 3.2 picks the r keys that received the largest attention from
    the queries of their local window) are the r keys with the largest dot product with the
    block's mean key, averaged: they depend only on the block's keys, which a decode step has;
  * the lookup query is the mean of a sliding causal window of queries (InfLLM scores the mean
    query of its 512-token execution block, exc_block_size, which depends on how the input is cut
    into calls): a token's selection never depends on the tokens sharing its forward call, and
    neighbouring queries share most of their selection, so the far part's union of blocks over a
    chunk of rows stays near ``topk``. ``lookup_queries`` = 1 is a per-query lookup. A decode step
    needs the last ``lookup_queries`` - 1 queries: each layer keeps them in the KV cache
    (``ctx.memory``, float32, (B, H, lookup_queries - 1, d));
  * no GPU/CPU offloading and no LRU: the KV cache is transformers' own and keeps every token
    (unrotated, as for any deferred-rotation method) and the lookup queries above. Representatives
    are recomputed from the cached keys at each call (one extra pass over the keys), not stored.
    Transient memory per layer call: a float32 copy of the keys rotated by -w (and one in the model
    dtype), block scores (B, Lq, n blocks), and per chunk of ``CHUNK`` query rows the gathered far
    keys / values and an additive mask over them.

The far part runs per chunk of query rows on one gather of the keys any row needs: the blocks every
row may select and some row did, masked per block, and the keys at the window's edge (initial tokens,
remainders, blocks not yet far for every row), masked per key. Each query's softmax is exactly over
its own allowed keys, whatever the chunking (tests/reference_block_memory.py is the dense reference).
Without a model mask, keys every row of a chunk attends (the middle of the local band, far blocks
every row selected) go to a second, unmasked call: torch's CPU flash kernel runs about a third faster
without a mask, and at 16k tokens on SmolLM2 the forward takes 1.1x plain SDPA in bfloat16 and 0.9x
in float32 (benchmarks/results/block_memory_cpu.txt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.two_part_merged import merge, sdpa_lse
from .base import RopeSpec, check_int
from .context import AttentionContext
from .registry import register
from .rerope import WindowedMethod

CHUNK = 256  # query rows per call: the far call reads the union of its rows' selected blocks
BLOCK_FRACTION = 64  # InfLLM's Llama-3 config (L0 = 8192): block_size = n_init = 128 = L0 / 64
MIN_BLOCK = 4
MEMORY_FRACTION = 4  # ... and topk * block_size = 16 * 128 = L0 / 4 tokens of selected memory
LOOKUP_FRACTION = 16  # ... and exc_block_size = 512 = L0 / 16 queries per lookup
MEMORY_KEY = "lookup_queries"


def representatives(blocks: torch.Tensor, r: int) -> torch.Tensor:
    """One representative per block (..., n, bs, d) -> (..., n, d): the mean of the r keys with the
    largest dot product with the block's mean key (ties: the earlier key); r = bs: the mean key.
    InfLLM (sec. 3.2, block-level memory units) takes the r keys of largest representative score,
    the dot products with the queries of the following local window (its code: the attention they
    received there); the block's mean key stands in for those queries, so the representative depends
    on the block's keys only."""
    centre = blocks.mean(dim=-2, keepdim=True)
    if r == blocks.shape[-2]:
        return centre.squeeze(-2)
    score = (blocks * centre).sum(dim=-1)
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :r]
    return blocks.gather(-2, top[..., None].expand(*top.shape, blocks.shape[-1])).mean(dim=-2)


def lookup_window(query: torch.Tensor, valid: torch.Tensor, past: torch.Tensor | None, n: int) -> torch.Tensor:
    """The queries this call's lookups read (B, H, n - 1 + Lq, d) float32: the row's n - 1 queries
    before the call (``past``; None: none, zeros), then the call's own, padding (``valid`` (B, Lq)
    False) zeroed. Its last n - 1 rows are the next call's ``past``."""
    B, H, Lq, d = query.shape
    new = query.float().masked_fill(~valid[:, None, :, None], 0.0)
    if past is None:
        past = new.new_zeros(B, H, n - 1, d)
    elif past.shape != (B, H, n - 1, d):
        raise ValueError(f"block_memory: the cache holds lookup queries of shape {tuple(past.shape)}, this call "
                         f"needs {(B, H, n - 1, d)}; a cache serves one model patched with one block_memory")
    return torch.cat([past, new], dim=2)


def window_sums(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n - 1 + Lq, m) -> (B, Lq, m): row i is the sum of rows i .. i + n - 1, as float64
    differences of a cumulative sum (one call over a sequence and calls over its pieces agree to
    float32 rounding). With ``block_scores`` of ``lookup_window``: the lookup query's score, the sum
    of the last n queries' (the score is linear in the query)."""
    total = torch.cat([scores.new_zeros(scores.shape[0], 1, scores.shape[2], dtype=torch.float64),
                       scores.double().cumsum(dim=1)], dim=1)
    return (total[:, n:] - total[:, : total.shape[1] - n]).float()


def block_scores(query: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """Score of block c for query i (B, Lq, n): sum over query heads h of (R(w) q[h, i]) . r[g(h), c]
    (InfLLM sec. 3.2: relevance of a memory unit, here per query and, as InfLLM's default, summed over
    all heads), computed
    as q . (R(-w) r): ``query`` (B, H, Lq, d) unrotated, ``reps`` (B, Hkv, n, d) of keys rotated by -w."""
    B, H, Lq, d = query.shape
    Hkv = reps.shape[1]
    grouped = query.reshape(B, Hkv, H // Hkv, Lq, d).sum(dim=2)  # the heads sharing a representative
    return torch.einsum("bkqd,bknd->bqn", grouped, reps)


def select_blocks(scores: torch.Tensor, candidate: torch.Tensor, topk: int) -> torch.Tensor:
    """The ``topk`` candidate blocks of best score per query (InfLLM sec. 3.2: top-k memory units),
    as a boolean (..., n); ties go to the earlier block, so selection is deterministic."""
    masked = scores.masked_fill(~candidate, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.zeros_like(candidate).scatter_(-1, order, True)
    return chosen & candidate


def candidate_blocks(q_pos: torch.Tensor, present: torch.Tensor, init_tokens: int, block_size: int,
                     window: int) -> torch.Tensor:
    """(B, Lq, n): block c (positions init + c bs .. init + (c + 1) bs - 1) is wholly present in the
    row and wholly far for the query (its last position <= p - window)."""
    last = init_tokens + (torch.arange(present.shape[1], device=q_pos.device) + 1) * block_size - 1
    return present[:, None, :] & (last[None, None, :] <= q_pos[:, :, None] - window)


@dataclass
class Layout:
    """Where each row's real keys sit (one run of consecutive positions from index ``first`` at
    position ``start``), which blocks are wholly present, and each key's block (-1: none)."""

    first: torch.Tensor
    start: torch.Tensor
    present: torch.Tensor
    block_of: torch.Tensor


def key_layout(valid: torch.Tensor, k_pos: torch.Tensor, init_tokens: int, block_size: int) -> Layout:
    """The blocks of each row, from its real keys (``valid``); refuses rows whose real keys are not
    one run of consecutive positions (packed sequences), where blocks would not be token runs."""
    Lk = valid.shape[1]
    index = torch.arange(Lk, device=valid.device)
    count = valid.sum(dim=1)
    first = valid.int().argmax(dim=1)
    start = k_pos.gather(1, first[:, None])[:, 0]
    run = (index[None] >= first[:, None]) & (index[None] < (first + count)[:, None])
    expected = start[:, None] + index[None] - first[:, None]
    if not (torch.equal(run, valid) and torch.equal(k_pos[run], expected[run])):
        raise ValueError("block_memory needs each row's real tokens at consecutive positions (left or right padding "
                         "is fine; packed sequences whose positions restart inside a row are not supported)")
    end = start + count
    n = max(0, int((end.max() - init_tokens) // block_size)) if Lk else 0
    lo = init_tokens + torch.arange(n, device=valid.device) * block_size
    present = (lo[None] >= start[:, None]) & (lo[None] + block_size <= end[:, None])
    block = torch.div(k_pos - init_tokens, block_size, rounding_mode="floor")
    inside = valid & (k_pos >= init_tokens) & (block < n)
    inside = inside & present.gather(1, block.clamp(0, n - 1)) if n else torch.zeros_like(inside)
    return Layout(first, start, present, torch.where(inside, block, -1))


def _part(q, k, v, mask: torch.Tensor | None, filled: torch.Tensor | None, scaling: float, softcap: float | None,
          eager: bool):
    """(out, lse) of one attention part with the additive ``mask`` (0 / the dtype's minimum; None:
    every key); ``filled`` (broadcastable to (B, H, Lq)) False where a row attends no key: output 0,
    lse -inf (None: every row attends one).
    torch's fused CPU kernel, else ``sdpa_lse``, or a dense differentiable form with the logit
    softcap (Gemma 2) or under autograd."""
    if k.shape[2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), torch.full(q.shape[:-1], float("-inf"), device=q.device)
    if eager:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s.masked_fill(mask != 0, torch.finfo(torch.float32).min)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float())
    elif q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scaling)
    else:
        out, lse = sdpa_lse(q, k, v, None if mask is None else mask == 0, False, scaling)
    if filled is None:
        return out, lse
    empty = ~filled.expand_as(lse)
    if eager:
        return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
    return out.masked_fill_(empty[..., None], 0.0), lse.masked_fill_(empty, float("-inf"))


def _merge(o1, l1, o2, l2) -> torch.Tensor:
    """``two_part_merged.merge`` (float32) for autograd: no in-place steps, and no gradient of an
    empty part (lse -inf) turns into NaN."""
    diff = l1 - l2
    w = torch.sigmoid(torch.where(torch.isnan(diff), torch.zeros_like(diff), diff))[..., None]
    return torch.lerp(o2.float(), o1.float(), w)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, d) at key indices (B, K) -> (B, H, K, d), one ``index_select`` per row (several
    times faster than ``gather`` with an expanded index on CPU)."""
    rows = [x[b:b + 1].index_select(2, index[b]) for b in range(x.shape[0])]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _joined(o1, l1, o2, l2, eager: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float32, lse) of two attention parts over disjoint keys: their merge and log(e^l1 + e^l2)."""
    return (_merge if eager else merge)(o1, l1, o2, l2), torch.logaddexp(l1, l2)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's minimum elsewhere (a finite minimum keeps gradients finite)."""
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, K) of each row's True entries of ``keep`` (B, N), ascending, K the most any row
    has; shorter rows are padded with index 0, flagged False in the second tensor."""
    count = keep.sum(dim=1)
    K = int(count.max()) if keep.shape[0] else 0
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, K)
    index = torch.zeros(keep.shape[0], K + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))
    return index[:, :K], torch.arange(K, device=keep.device)[None] < count[:, None]


def aligned(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Positions follow the key index in every row and the queries are the last keys."""
    steps = torch.arange(k_pos.shape[1], device=k_pos.device)
    return torch.equal(k_pos, k_pos[:, :1] + steps) and torch.equal(q_pos, k_pos[:, k_pos.shape[1] - q_pos.shape[1]:])


@register("block_memory")
@dataclass(frozen=True, kw_only=True)
class BlockMemory(WindowedMethod):
    summary: ClassVar[str] = ("InfLLM block memory: initial tokens + local window + top-k key blocks by "
                              "representative score, far keys at one fixed distance")
    reference: ClassVar[str] = ("Xiao et al. 2024, InfLLM: Training-Free Long-Context Extrapolation for LLMs "
                                "with an Efficient Context Memory")
    init_tokens: int
    block_size: int
    representatives: int
    topk: int
    lookup_queries: int
    uses_layer_memory: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "init_tokens", minimum=0)
        check_int(self, "block_size", minimum=1)
        check_int(self, "representatives", minimum=1)
        check_int(self, "topk", minimum=1)
        check_int(self, "lookup_queries", minimum=1)
        if self.representatives > self.block_size:
            raise ValueError(f"{self.name}: representatives={self.representatives} must be <= block_size="
                             f"{self.block_size} (the representative keys are picked from one block's keys)")

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """InfLLM's Llama-3-8B config (thunlp/InfLLM config/llama-3-inf-llm.yaml, trained 8192:
        n_local 4096, n_init 128, block_size 128, topk 16, repr_topk 4) scaled to the trained
        length L0: window L0 / 2, block_size = init_tokens = L0 / 64 (at least 4), topk blocks
        holding L0 / 4 tokens, lookup over L0 / 16 queries (exc_block_size 512; at least 1).
        Length-independent, as in InfLLM. Not InfLLM's: representatives = block_size, the block's
        mean key. InfLLM's repr_topk 4 keys, taken as the 4 most aligned with the block mean (its
        attention-based pick needs queries a decode step lacks), found 1-2 of 12 passkeys past the
        window on SmolLM2 where the mean found 10-11 of 12 and attending every block 12 of 12
        (benchmarks/results/block_memory_retrieval.txt)."""
        params = super().defaults_for(spec, length, **given)
        trained = cls.trained(spec, params)
        block = params.setdefault("block_size", max(MIN_BLOCK, trained // BLOCK_FRACTION))
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            block = max(MIN_BLOCK, trained // BLOCK_FRACTION)  # the given one is refused by name at construction
        params.setdefault("init_tokens", block)
        params.setdefault("representatives", block)
        params.setdefault("topk", max(1, trained // (MEMORY_FRACTION * block)))
        params.setdefault("lookup_queries", max(1, trained // LOOKUP_FRACTION))
        return params

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        within = int((ctx.q_pos[:, -1] - ctx.k_pos[:, 0]).max()) < self.window
        if ctx.memory is not None or not within:
            with torch.no_grad():
                past = None if ctx.memory is None else ctx.memory.get(MEMORY_KEY)
                lookup = lookup_window(query, ctx.query_valid(), past, self.lookup_queries)
            if ctx.memory is not None:
                ctx.memory[MEMORY_KEY] = lookup[:, :, lookup.shape[2] - (self.lookup_queries - 1):].clone()
        q_near = ctx.rotate(query, ctx.q_pos, "q")
        if within:
            return ctx.base(q_near, ctx.rotate(key, ctx.k_pos, "k"), value)
        k_near = ctx.rotate(key, ctx.k_pos, "k")
        # far part: (R(w) q) . k = q . (R(-w) k): rotate the keys (fewer under GQA), not the queries
        k_far32 = ctx.rotate(key.float(), torch.full_like(ctx.k_pos, -self.window), "k_far_folded")
        k_far = k_far32.to(key.dtype)
        mask = None if ctx.mask is None else ctx.allowed().expand(query.shape[0], -1, -1, -1)
        valid = self._valid_keys(ctx, mask)
        layout = key_layout(valid, ctx.k_pos, self.init_tokens, self.block_size)
        with torch.no_grad():
            reps = self._representatives(k_far32, layout)
            candidate = candidate_blocks(ctx.q_pos, layout.present, self.init_tokens, self.block_size, self.window)
            selected = select_blocks(window_sums(block_scores(lookup, reps), self.lookup_queries), candidate, self.topk)
        eager = bool(ctx.softcap) or (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
        band = self._band(min(CHUNK, query.shape[2]), query.dtype) if mask is None and aligned(ctx.q_pos, ctx.k_pos) else None
        B, H, Lq = query.shape[:3]
        out = None if eager else torch.empty(B, H, Lq, value.shape[-1], device=query.device)
        outs = []
        for s in range(0, Lq, CHUNK):
            e = min(s + CHUNK, query.shape[2])
            rows = None if mask is None else mask[..., s:e, :]
            o_n, l_n = self._near(q_near[:, :, s:e], k_near, value, ctx, rows, layout, band, s, e, eager)
            far = self._far(query[:, :, s:e], k_far, value, ctx, rows, layout, candidate[:, s:e], selected[:, s:e],
                            s, e, eager)
            if eager:
                outs.append(o_n.float() if far is None else _merge(o_n, l_n, *far))
            elif far is None:
                out[:, :, s:e] = o_n
            else:
                merge(o_n, l_n, *far, out=out[:, :, s:e])
        merged = torch.cat(outs, dim=2) if eager else out
        return merged.to(value.dtype).transpose(1, 2)

    @staticmethod
    def _valid_keys(ctx: AttentionContext, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, Lk) keys some query may attend: the row's real tokens."""
        if mask is None:
            return ctx.k_pos <= ctx.q_pos.max(dim=1, keepdim=True).values
        return mask.any(dim=2).any(dim=1).expand(ctx.k_pos.shape[0], -1)

    def _representatives(self, key: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(B, Hkv, n, d) float32 representatives of every block position range (absent ones unused)."""
        n = layout.present.shape[1]
        index = self._block_keys(layout, torch.arange(n, device=key.device).expand(key.shape[0], -1))
        index = index.clamp(0, key.shape[2] - 1).reshape(key.shape[0], 1, -1, 1)
        blocks = key.float().gather(2, index.expand(-1, key.shape[1], -1, key.shape[3]))
        return representatives(blocks.reshape(*key.shape[:2], n, self.block_size, key.shape[3]), self.representatives)

    def _block_keys(self, layout: Layout, blocks: torch.Tensor) -> torch.Tensor:
        """Key indices (B, m, block_size) of blocks (B, m): a row's positions follow its key index."""
        first = layout.first - layout.start + self.init_tokens
        steps = torch.arange(self.block_size, device=blocks.device)
        return first[:, None, None] + blocks[..., None] * self.block_size + steps

    def _band(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (rows, window + rows - 1) of aligned query rows r over keys [s - w + 1, s + rows):
        key t is near for row r iff r <= t <= r + w - 1."""
        r = torch.arange(rows)[:, None]
        t = torch.arange(self.window + rows - 1)[None, :]
        return additive((t >= r) & (t <= r + self.window - 1), dtype)

    def _near(self, q, k, v, ctx: AttentionContext, rows, layout: Layout, band, s: int, e: int, eager: bool):
        """Local part of query rows [s, e): ordinary RoPE over the keys within the window. Aligned
        rows (``band``) split their keys: those near for every row of the chunk are attended without
        a mask (torch's CPU kernel is about a third faster so), the band's two edges with it."""
        q_pos = ctx.q_pos[:, s:e]
        if band is not None:
            offset = k.shape[2] - ctx.q_pos.shape[1]
            lo = s + offset - self.window + 1  # key index of the band's column 0
            first, common, own = max(lo, 0), max(e + offset - self.window, 0), s + offset  # [common, own): every row
            if common >= own:
                return _part(q, k[:, :, first:e + offset], v[:, :, first:e + offset], band[: e - s, first - lo: e + offset - lo],
                             None, ctx.scaling, ctx.softcap, eager)
            edges = [slice(first, common), slice(own, e + offset)]
            mask = torch.cat([band[: e - s, c.start - lo: c.stop - lo] for c in edges], dim=1)
            masked = _part(q, torch.cat([k[:, :, c] for c in edges], dim=2), torch.cat([v[:, :, c] for c in edges], dim=2),
                           mask, None, ctx.scaling, ctx.softcap, eager)
            dense = _part(q, k[:, :, common:own], v[:, :, common:own], None, None, ctx.scaling, ctx.softcap, eager)
            return _joined(*masked, *dense, eager)
        shift = layout.first - layout.start
        lo = int((shift + torch.maximum(layout.start, q_pos.min(dim=1).values - self.window + 1)).min())
        hi = int((shift + q_pos.max(dim=1).values + 1).max())
        lo = min(max(lo, 0), k.shape[2] - 1)
        hi = min(max(hi, lo + 1), k.shape[2])
        rel = q_pos[:, None, :, None] - ctx.k_pos[:, None, None, lo:hi]
        near = (rel >= 0) & (rel < self.window)
        if rows is not None:
            near = near & rows[..., lo:hi]
        return _part(q, k[:, :, lo:hi], v[:, :, lo:hi], additive(near, q.dtype), near.any(dim=-1), ctx.scaling,
                     ctx.softcap, eager)

    def _far(self, q, k, v, ctx: AttentionContext, rows, layout: Layout, candidate, selected, s: int, e: int, eager: bool):
        """Far part of query rows [s, e), at the fixed distance ``window``: the blocks that are
        candidates for every row and selected by one (masked per block; without a model mask those
        selected by every row unmasked, in a second call), then every other key some row sees as far
        (initial tokens, remainders, blocks at the window's edge: per key); None when no row has a
        far key."""
        q_pos = ctx.q_pos[:, s:e]
        B, C = q_pos.shape
        block_of = layout.block_of
        n = candidate.shape[-1]
        reach = ctx.k_pos <= q_pos.max(dim=1, keepdim=True).values - self.window
        if rows is not None:
            reach = reach & rows.any(dim=2).any(dim=1)
        if not bool(reach.any()):
            return None
        whole = candidate.all(dim=1) if n else layout.present
        used = whole & selected.any(dim=1)
        common = None
        if rows is None and n:  # blocks every row selected, as many per batch row, are attended without a mask
            every = used & selected.all(dim=1)
            common = every & (every.cumsum(dim=1) <= int(every.sum(dim=1).min()))
            used = used & ~common
        in_whole = (block_of >= 0) & whole.gather(1, block_of.clamp(min=0)) if n else torch.zeros_like(reach)
        e_index, e_ok = compact(reach & ~in_whole)
        u_blocks, u_ok = compact(used)
        u_index = self._block_keys(layout, u_blocks).reshape(B, -1).clamp(0, k.shape[2] - 1)
        index = torch.cat([e_index, u_index], dim=1)
        k_g, v_g = take(k, index), take(v, index)
        ok_each = (q_pos[:, :, None] - ctx.k_pos.gather(1, e_index)[:, None, :] >= self.window) & e_ok[:, None, :]
        if n:
            blk = block_of.gather(1, e_index)
            at = blk.clamp(min=0)[:, None, :].expand(-1, C, -1)
            ok_each = ok_each & ((blk[:, None, :] < 0) | ~candidate.gather(2, at) | selected.gather(2, at))
        ok_used = selected.gather(2, u_blocks[:, None, :].expand(-1, C, -1)) & u_ok[:, None, :]
        mask = q.new_empty(B, 1, C, index.shape[1])
        mask[..., : e_index.shape[1]] = additive(ok_each, q.dtype)[:, None]
        mask[..., e_index.shape[1]:].unflatten(-1, (u_blocks.shape[1], self.block_size)).copy_(
            additive(ok_used, q.dtype)[:, None, :, :, None])
        filled = (ok_each.any(dim=-1) | ok_used.any(dim=-1))[:, None]
        if rows is not None:
            allowed = rows.gather(-1, index[:, None, None, :].expand(-1, rows.shape[1], C, -1))
            mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)
            filled = (mask == 0).any(dim=-1)
        masked = _part(q, k_g, v_g, mask, filled, ctx.scaling, ctx.softcap, eager)
        if common is None or not bool(common.any()):
            return masked
        c_index = self._block_keys(layout, compact(common)[0]).reshape(B, -1)
        return _joined(*masked, *_part(q, take(k, c_index), take(v, c_index), None, None, ctx.scaling, ctx.softcap, eager), eager)
