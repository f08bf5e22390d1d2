"""Reference two-part attention: ReRoPE, Leaky ReRoPE and Self-Extend in one query-blocked loop.

Each of these methods scores a query i against a key j with ordinary RoPE when they are near
(0 <= p_i - p_j < w) and with remapped positions when they are far. The reference implementations
build two full L x L score matrices per head; here queries are processed in blocks, so memory is
O(block * L) per head and the result is the same.
"""
from __future__ import annotations

import torch


def two_part_attention(
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
    """softmax_j(s_ij) v_j with s_ij = q_near_i . k_near_j if 0 <= p_i - p_j < window else q_far_i . k_far_j.

    q_*: (B, H, Lq, d); k_*, value: (B, Hkv, Lk, d) with Hkv dividing H (GQA, not repeated);
    q_pos (B, Lq), k_pos (B, Lk) integer positions; ``allowed`` a bool mask broadcastable to
    (B, H, Lq, Lk) (True = may attend) or None; keys after the query are always masked. Keys are
    index-aligned with the queries (the last Lq keys are the queries' own), as in causal LMs, so
    each query block only reads the keys up to its end.
    ``softcap`` applies Gemma 2's s -> c tanh(s / c). Returns (B, Lq, H, dv), transformers' layout.
    """
    B, H, Lq, d = q_near.shape
    Hkv = k_near.shape[1]
    group = H // Hkv
    out = value.new_empty(B, H, Lq, value.shape[-1])
    kn, kf, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k_near, k_far, value))
    offset = k_pos.shape[1] - Lq  # keys are index-aligned with queries: later keys are in the future
    for start in range(0, Lq, block_size):
        end = min(start + block_size, Lq)
        stop = end + offset
        rel = q_pos[:, None, start:end, None] - k_pos[:, None, None, :stop]
        near = (rel >= 0) & (rel < window)
        s_near = torch.matmul(q_near[:, :, start:end], kn[:, :, :stop].transpose(-1, -2))
        s_far = torch.matmul(q_far[:, :, start:end], kf[:, :, :stop].transpose(-1, -2))
        scores = torch.where(near, s_near, s_far).float() * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        keep = rel >= 0
        if allowed is not None:
            keep = keep & allowed[..., start:end, :stop]
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype)
        out[:, :, start:end] = torch.matmul(probs, v[:, :, :stop])
    return out.transpose(1, 2).contiguous()
