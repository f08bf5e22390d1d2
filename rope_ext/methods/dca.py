"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models", sec. 3; code: HKUNLP/ChunkLlama, ``chunkllama_attn_replace.py``).

The sequence is cut into chunks of s = chunk_size - local_window positions (ChunkLlama's
``chunk_len``; the paper's chunk size s). Keys sit at P_k[j] = j mod s (eq. 2); a query sits at one
of three positions, by how many chunks lie between it and the key (sec. 3.3, the combined M[i][j]):

    same chunk          P_q^intra[i] = i mod s                                   (eq. 2)
    previous chunk      P_q^succ[i]  = min(s + (i mod s), chunk_size)            (eq. 7)
    two or more back    P_q^inter[i] = min(2 s - 1, chunk_size)                  (eq. 5)

so r'(i, j) = P_q^part[i] - P_k[j] never exceeds ``dca_max_distance`` = min(2 s - 1, chunk_size).
ChunkLlama's ``chunk_size`` is the paper's c - 1 (the largest query position) and its
``local_window`` the paper's w - 1: its code clamps ``arange(s) + s`` at ``chunk_size``, so the first
``local_window + 1`` queries of a chunk see the previous chunk at exact distances. ChunkLlama's cos/sin
also carry a temperature 0.05 ln(L / L0) + 1 that depends on the longest length the process has
seen (state, not part of the paper's method): it is not applied here; ``logn=True`` is the
stateless alternative.

Attention is one softmax over all keys, computed as three SDPA calls (intra, successive, inter)
merged by log-sum-exp (``rope_ext.kernels.two_part_merged.merge``): with positions following the
key index and no padding mask, per query chunk (``_by_chunks``: about plain causal SDPA's work);
with a padding mask or a KV cache under padding, per query block with boolean masks
(``_masked_blocks``); with a logit softcap or in training, per query block from score matrices
(``_dense_blocks``). Chunks follow positions, so a left-padded row equals the same tokens unpadded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.two_part_merged import merge, sdpa_lse
from .base import Method, RopeSpec, check_int, check_target_length
from .context import AttentionContext
from .registry import register

BLOCK = 256  # query rows per block of the masked and dense paths


def dca_key_positions(k_pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """P_k[j] = j mod s (An et al. 2024, eq. 2)."""
    return k_pos % chunk_len


def dca_query_positions(q_pos: torch.Tensor, chunk_size: int, local_window: int) -> tuple[torch.Tensor, ...]:
    """(P_q^intra, P_q^succ, P_q^inter) (An et al. 2024, eq. 2, 7, 5; ChunkLlama's q_t, qc_t and
    qc_t[s - 1]), s = chunk_size - local_window."""
    s = chunk_size - local_window
    intra = q_pos % s
    return intra, (intra + s).clamp(max=chunk_size), torch.full_like(q_pos, dca_max_distance(chunk_size, local_window))


def dca_max_distance(chunk_size: int, local_window: int) -> int:
    """The inter-chunk query position min(2 s - 1, chunk_size): the largest distance DCA attends at."""
    return min(2 * (chunk_size - local_window) - 1, chunk_size)


def dca_relative(i: torch.Tensor, j: torch.Tensor, chunk_size: int, local_window: int) -> torch.Tensor:
    """r'(i, j) = P_q^part[i] - P_k[j], part by floor(i / s) - floor(j / s) = 0, 1, > 1 (sec. 3.3)."""
    s = chunk_size - local_window
    gap = torch.div(i, s, rounding_mode="floor") - torch.div(j, s, rounding_mode="floor")
    intra, succ, inter = dca_query_positions(i, chunk_size, local_window)
    q = torch.where(gap == 0, intra, torch.where(gap == 1, succ, inter))
    return q - dca_key_positions(j, s)


def dca_attention(q_intra: torch.Tensor, q_succ: torch.Tensor, q_inter: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int,
                  allowed: torch.Tensor | None, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """softmax_j(q_part(i, j) . k_j * scaling) v_j, part = intra / succ / inter by the chunk gap
    floor(p_i / s) - floor(p_j / s) = 0 / 1 / >= 2 (s = ``chunk_len``). q_* (B, H, Lq, d) rotated to
    their three positions, key (B, Hkv, Lk, d) rotated to P_k, Hkv dividing H, the queries being the
    last Lq keys; ``allowed`` bool, broadcastable to (B, H, Lq, Lk), or None (causal by position).
    Returns (B, Lq, H, dv)."""
    qs = (q_intra, q_succ, q_inter)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*qs, key, value))
    group = q_intra.shape[1] // key.shape[1]
    fused = key.device.type == "cpu" and value.shape[-1] == q_intra.shape[-1]  # CPU flash takes grouped KV heads
    if softcap is not None or needs_grad:
        out = _dense_blocks(qs, key, value, q_pos, k_pos, chunk_len, allowed, scaling, softcap)
    else:
        if group > 1 and not fused:
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        if allowed is None and _aligned(q_pos, k_pos):
            out = _by_chunks(qs, key, value, int(k_pos[0, 0]), chunk_len, scaling)
        else:
            out = _masked_blocks(qs, key, value, q_pos, k_pos, chunk_len, allowed, scaling)
    return out.to(value.dtype).transpose(1, 2).contiguous()


def _aligned(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Every row has the same positions, following the key index, and the queries are the last keys."""
    steps = k_pos[:1, :1] + torch.arange(k_pos.shape[1], device=k_pos.device)[None]
    return torch.equal(k_pos, steps.expand_as(k_pos)) and torch.equal(q_pos, k_pos[:, k_pos.shape[1] - q_pos.shape[1]:])


def _accumulate(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output float32, lse) of one softmax over the disjoint key sets of ``parts`` (log-sum-exp merge)."""
    out, lse = parts[0][0].float(), parts[0][1].float()
    for o, l in parts[1:]:
        l = l.float()
        out = merge(out, lse, o, l)
        lse = torch.logaddexp(lse, l)
    return out, lse


def _by_chunks(qs, key, value, p0: int, s: int, scaling: float) -> torch.Tensor:
    """Positions p0 + row for every row, no mask: per query chunk n, the intra part on its own chunk
    (a causal square, after an unmasked call on the chunk's keys before the first query when a
    cache holds them), the successive part on chunk n - 1 and the inter part on chunks <= n - 2,
    each one unmasked SDPA call with grouped KV heads as they are. Returns (B, H, Lq, dv) float32."""
    Lq, Lk = qs[0].shape[2], key.shape[2]
    offset = Lk - Lq
    out = torch.empty(*qs[0].shape[:3], value.shape[-1], dtype=torch.float32, device=value.device)
    for n in range((p0 + offset) // s, (p0 + Lk - 1) // s + 1):
        ks, qs_row, qe = max(0, n * s - p0), max(offset, n * s - p0), min(Lk, (n + 1) * s - p0)
        rows = slice(qs_row - offset, qe - offset)
        q_in, q_su, q_it = (q[:, :, rows] for q in qs)
        parts = [sdpa_lse(q_in, key[:, :, qs_row:qe], value[:, :, qs_row:qe], None, qe - qs_row > 1, scaling)]
        if ks < qs_row:
            parts.append(sdpa_lse(q_in, key[:, :, ks:qs_row], value[:, :, ks:qs_row], None, False, scaling))
        prev = max(0, (n - 1) * s - p0)
        if prev < ks:
            parts.append(sdpa_lse(q_su, key[:, :, prev:ks], value[:, :, prev:ks], None, False, scaling))
        if prev > 0:
            parts.append(sdpa_lse(q_it, key[:, :, :prev], value[:, :, :prev], None, False, scaling))
        out[:, :, rows] = _accumulate(parts)[0]
    return out


def _part_masks(q_pos, k_pos, s: int, allowed, start: int, end: int, stop: int) -> list[torch.Tensor]:
    """Bool masks (B, 1|H, e - s, stop) of the intra, successive and inter keys of query rows [start, end)."""
    qp, kp = q_pos[:, None, start:end, None], k_pos[:, None, None, :stop]
    keep = kp <= qp
    if allowed is not None:
        keep = keep & allowed[..., start:end, :stop]
    gap = torch.div(qp, s, rounding_mode="floor") - torch.div(kp, s, rounding_mode="floor")
    return [keep & (gap == 0), keep & (gap == 1), keep & (gap >= 2)]


def _masked_blocks(qs, key, value, q_pos, k_pos, s: int, allowed, scaling: float) -> torch.Tensor:
    """Any positions and mask: per query block, three masked SDPA calls over the keys up to the
    block's end, merged by log-sum-exp; rows with no visible key give 0. (B, H, Lq, dv) float32."""
    Lq, Lk = qs[0].shape[2], key.shape[2]
    out = torch.empty(*qs[0].shape[:3], value.shape[-1], dtype=torch.float32, device=value.device)
    for start in range(0, Lq, BLOCK):
        end = min(start + BLOCK, Lq)
        stop = end + Lk - Lq
        masks = _part_masks(q_pos, k_pos, s, allowed, start, end, stop)
        parts = [sdpa_lse(q[:, :, start:end], key[:, :, :stop], value[:, :, :stop], m, False, scaling) for q, m in zip(qs, masks)]
        out[:, :, start:end] = _accumulate(parts)[0]
    return out


def _dense_blocks(qs, key, value, q_pos, k_pos, s: int, allowed, scaling: float, softcap) -> torch.Tensor:
    """Per query block, the three score matrices picked per (i, j), softcap, mask and softmax in
    float32: differentiable by autograd, any device. (B, H, Lq, dv) float32."""
    Lq, Lk = qs[0].shape[2], key.shape[2]
    group = qs[0].shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (key, value))
    outs = []
    for start in range(0, Lq, BLOCK):
        end = min(start + BLOCK, Lq)
        stop = end + Lk - Lq
        masks = _part_masks(q_pos, k_pos, s, allowed, start, end, stop)
        scores = torch.zeros((), dtype=torch.float32, device=value.device)
        for q, m in zip(qs, masks):
            part = torch.matmul(q[:, :, start:end].float(), key[:, :, :stop].float().transpose(-1, -2))
            scores = torch.where(m, part, scores)
        scores = scores * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        keep = masks[0] | masks[1] | masks[2]
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(probs, value[:, :, :stop].float()))
    return torch.cat(outs, dim=2)


@register("dca")
@dataclass(frozen=True, kw_only=True)
class DualChunkAttention(Method):
    """DCA with ChunkLlama's parameters: chunk_size (largest query position, the paper's c - 1) and
    local_window (exact distances kept into the previous chunk); chunks of chunk_size - local_window."""

    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "deferred"
    summary: ClassVar[str] = "Dual Chunk Attention: intra / successive / inter-chunk positions, merged by log-sum-exp"
    reference: ClassVar[str] = "An et al. 2024, Training-Free Long-Context Scaling of Large Language Models (ChunkLlama)"
    chunk_size: int
    local_window: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "chunk_size", minimum=1)
        check_int(self, "local_window", minimum=0)
        if self.local_window >= self.chunk_size:
            raise ValueError(f"dca: local_window={self.local_window} must be < chunk_size={self.chunk_size} "
                             f"(chunks hold chunk_size - local_window >= 1 positions)")

    @property
    def chunk_len(self) -> int:
        """s = chunk_size - local_window (ChunkLlama's chunk_len)."""
        return self.chunk_size - self.local_window

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """ChunkLlama's ``replace_with_chunkllama`` (chunkllama_attn_replace.py): chunk_size = 3 L0 // 4,
        local_window = L0 // 8 (L0 the trained length), each unless given; the same at any ``length``."""
        check_target_length(cls, length)
        params = dict(given)
        trained = params.get("original_max_position_embeddings") or spec.trained_length
        if isinstance(trained, int) and not isinstance(trained, bool):
            params.setdefault("chunk_size", trained * 3 // 4)
            params.setdefault("local_window", trained // 8)
        return params

    def bind(self, spec: RopeSpec) -> DualChunkAttention:
        bound = super().bind(spec)
        farthest = dca_max_distance(self.chunk_size, self.local_window)
        if farthest >= bound.trained_length:
            raise ValueError(
                f"dca: chunk_size={self.chunk_size}, local_window={self.local_window} attend at distances up to "
                f"min(2 (chunk_size - local_window) - 1, chunk_size) = {farthest}, which must be < the trained length "
                f"(original_max_position_embeddings={bound.trained_length}); give a smaller chunk_size")
        return bound

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        s = self.chunk_len
        if int(ctx.k_pos.max()) < s:  # one chunk: P_q = P_k = true positions, plain RoPE attention
            return super().attend(query, key, value, ctx)
        intra, succ, inter = dca_query_positions(ctx.q_pos, self.chunk_size, self.local_window)
        q_intra = ctx.rotate(query, intra, "dca_q_intra")
        q_succ = ctx.rotate(query, succ, "dca_q_succ")
        q_inter = ctx.rotate(query, inter, "dca_q_inter")
        k = ctx.rotate(key, dca_key_positions(ctx.k_pos, s), "dca_k")
        allowed = None if ctx.mask is None else ctx.allowed()
        return dca_attention(q_intra, q_succ, q_inter, k, value, ctx.q_pos, ctx.k_pos, s, allowed, ctx.scaling, ctx.softcap)
