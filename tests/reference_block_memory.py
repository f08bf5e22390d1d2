"""An independent dense reference for InfLLM-style block memory (Xiao et al. 2024, "InfLLM:
Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory", sec. 3),
written from the paper in float64 with explicit loops over rows, blocks and queries. Imports nothing
from rope_ext.

For query i at position p (keys j at positions p_j, real tokens only, causal, optional sliding window):
  * 0 <= p - p_j < w (local window): score at relative position p - p_j;
  * p - p_j >= w: score at the fixed relative position w, attended when p_j < n_init (initial
    tokens), or p_j lies in a block (positions n_init + c bs .. + bs - 1) that is not wholly present
    and far for i, or in one of the top-k such blocks by
        score_i(c) = sum_h Re(<R(w) q_h,i , r_g(h),c>)   (RoPE's score at distance w)
    where r_c is the mean of the ``representatives`` keys of block c with the largest dot product
    with the block's mean key (ties: earlier key; top-k ties: earlier block), and q_h,i here is the
    lookup query: the sum of q_h,t over the real tokens t among the row's last ``lookup_queries``
    indices up to i.
Scores use RoPE's complex form (RoFormer eq. 16): Re(sum_f z_q conj(z_k) e^{i r theta_f}) on the
rotary dims plus q.k on the rest.
"""
from __future__ import annotations

from typing import Any

import torch


def rope_score(q: torch.Tensor, k: torch.Tensor, rel: torch.Tensor, theta: torch.Tensor, magnitude: float,
               d: int) -> torch.Tensor:
    """RoPE's score of q (..., D) and k (..., D) at relative position rel (broadcast), float64."""
    zq = torch.complex(q[..., : d // 2], q[..., d // 2: d])
    zk = torch.complex(k[..., : d // 2], k[..., d // 2: d])
    turn = torch.exp(1j * rel[..., None].double() * theta)
    return magnitude ** 2 * (zq * zk.conj() * turn).sum(-1).real + (q[..., d:] * k[..., d:]).sum(-1)


def block_representative(keys: torch.Tensor, r: int) -> torch.Tensor:
    """keys (bs, D) in position order -> the mean of the r keys most aligned with the block mean."""
    centre = keys.mean(dim=0)
    alignment = [float((keys[t] @ centre).detach()) for t in range(keys.shape[0])]
    chosen = sorted(range(keys.shape[0]), key=lambda t: (-alignment[t], t))[:r]
    return keys[chosen].mean(dim=0)


def block_memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           padding: torch.Tensor, params: dict[str, Any], theta: torch.Tensor, magnitude: float,
                           rotary_dim: int, scaling: float, sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """q (B, H, L, D) and k, v (B, Hkv, L, D) unrotated (Hkv divides H; repeated heads are fine),
    ``positions`` (B, L), ``padding`` (B, L) True for real tokens -> (B, L, H, Dv) float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, L, _ = q.shape
    group = H // k.shape[1]
    w, n_init, bs = params["window"], params["init_tokens"], params["block_size"]
    r, topk, n_lookup = params["representatives"], params["topk"], params["lookup_queries"]
    out = torch.zeros(B, L, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        index_of = {int(positions[b, j]): j for j in range(L) if padding[b, j]}
        n_blocks = max(0, (max(index_of, default=-1) + 1 - n_init) // bs)
        present = [all(n_init + c * bs + t in index_of for t in range(bs)) for c in range(n_blocks)]
        reps = {c: [block_representative(k[b, g, [index_of[n_init + c * bs + t] for t in range(bs)]], r)
                    for g in range(k.shape[1])] for c in range(n_blocks) if present[c]}
        for i in range(L):
            p = int(positions[b, i])
            candidates = [c for c in reps if n_init + (c + 1) * bs - 1 <= p - w]
            far_rel = torch.tensor(float(w))
            lookup = sum(q[b, :, t] for t in range(max(0, i - n_lookup + 1), i + 1) if padding[b, t])
            score = {c: sum(float(rope_score(lookup[h], reps[c][h // group], far_rel, theta, magnitude, rotary_dim).detach())
                            for h in range(H)) for c in candidates}
            chosen = set(sorted(candidates, key=lambda c: (-score[c], c))[:topk])
            keys, rels = [], []
            for j in range(L):
                rel = p - int(positions[b, j])
                if not padding[b, j] or rel < 0 or (sliding_window is not None and rel >= sliding_window):
                    continue
                if rel >= w:
                    block = (int(positions[b, j]) - n_init) // bs if int(positions[b, j]) >= n_init else None
                    if block in candidates and block not in chosen:
                        continue
                    rel = w
                keys.append(j)
                rels.append(rel)
            if not keys:
                continue
            rel_t = torch.tensor(rels, dtype=torch.float64)
            for h in range(H):
                s = rope_score(q[b, h, i][None], k[b, h // group, keys], rel_t, theta, magnitude, rotary_dim) * scaling
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                out[b, i, h] = torch.softmax(s, dim=0) @ v[b, h // group, keys]
    return out


def dense_inputs(B: int, H: int, Hkv: int, L: int, D: int, pad: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random q (B, H, L, D), k, v (B, Hkv, L, D), positions and padding (row 1 left-padded by ``pad``)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    padding = torch.ones(B, L, dtype=torch.bool)
    padding[1:, :pad] = False
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    return q, k, v, positions, padding


def rope_theta(b: float, d: int) -> torch.Tensor:
    """theta_f = b^(-2f/d) (RoFormer eq. 15), float64."""
    return b ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)

