"""CoPE (Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important";
facebookresearch/RAM ``projects/cope/src/cope/context_position.py``): no rotation; positions
are counted by the context. Per query i and key j (j <= i):

    g_ij = sigmoid(q_i . k_j / sqrt(d))                     gates
    p_ij = sum_{t=j..i} g_it                                 contextual position (all gates 1: i - j + 1)
    e[p] = (p - floor p) e[ceil p] + (1 - p + floor p) e[floor p]   learned embeddings e[0..npos-1]
    a_ij = softmax_j((q_i . k_j + q_i . e[p_ij]) / sqrt(d))

p is clamped to npos - 1 (so any length runs); q . e[p] is interpolated from q . e[floor p] and
q . e[ceil p], as the reference computes it. e (head_dim x npos) is one per layer, shared by its heads,
initialised to zero; npos defaults to the trained length + 1 (the reference's block size + 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rope_ext.validate import MAX_COUNT, integer

from . import register
from .base import AttentionCall, Encoding, attach, remove_rotation, softmax_attention, use_attention


def cope_gates(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """g_ij = sigmoid(q_i . k_j * scaling) (B, H, Lq, Lk) in float32."""
    return torch.sigmoid(torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling)


def cope_positions(gates: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """p_ij = sum over visible keys t >= j of g_it (B, H, Lq, Lk): the gates of the keys from j up to the
    query (``allowed``: which keys each query sees, causal + padding) summed."""
    visible = gates * allowed
    return visible.flip(-1).cumsum(dim=-1).flip(-1)


def cope_position_logits(query: torch.Tensor, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q_i . e[p_ij] (B, H, Lq, Lk) for e (d, npos), p clamped to npos - 1 and linearly interpolated
    between the integer positions floor p and ceil p."""
    p = positions.clamp(max=embeddings.shape[-1] - 1)
    fixed = torch.matmul(query.float(), embeddings.float())
    floor = p.floor()
    weight = p - floor
    return fixed.gather(-1, p.ceil().long()) * weight + fixed.gather(-1, floor.long()) * (1 - weight)


class CopeEmbedding(torch.nn.Module):
    """One layer's position embeddings e (head_dim, npos) and the attention that counts with them."""

    def __init__(self, head_dim: int, npos: int) -> None:
        super().__init__()
        self.embeddings = torch.nn.Parameter(torch.zeros(head_dim, npos))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        positions = cope_positions(cope_gates(query, key, call.scaling), call.allowed)
        bias = cope_position_logits(query, self.embeddings, positions) * call.scaling
        return softmax_attention(query, key, value, call, bias)


@register("cope")
@dataclass(frozen=True, kw_only=True)
class CoPE(Encoding):
    """CoPE: positions counted by sigmoid gates of q . k, interpolated learned embeddings."""

    paper: ClassVar[str] = "Golovneva et al. 2024, Contextual Position Encoding: Learning to Count What's Important"
    rope_based: ClassVar[bool] = False
    npos: int | None = None

    def __post_init__(self) -> None:
        if self.npos is not None:
            integer(self.npos, "cope: npos", minimum=2, maximum=MAX_COUNT)

    def install(self, model: torch.nn.Module) -> None:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        npos = self.npos if self.npos is not None else config.max_position_embeddings + 1
        device = model.model.embed_tokens.weight.device
        attach(model, lambda _: CopeEmbedding(head_dim, npos).to(device))
        remove_rotation(model)
        use_attention(model, self.name)
