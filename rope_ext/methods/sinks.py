"""Attention sinks with a rolling KV cache (Xiao et al. 2023, "Efficient Streaming Language Models
with Attention Sinks", sec. 3.2; mit-han-lab/streaming-llm).

The cache keeps the first ``sinks`` tokens (the attention sinks) and the most recent ``window``
tokens; the ones between are evicted. Positions are assigned inside the cache: a kept key is
attended at its slot among the kept tokens and a new query at the next slot, so no relative
distance exceeds sinks + window however long the stream ("we focus on positions within the cache
rather than those in the original text", sec. 3.2). ``sinks=0`` is the window-only cache the paper
compares against. Any method with ``sinks`` and ``cache_window`` gets this policy (``Method``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .context import CachePolicy


def sink_keep_indices(valid: torch.Tensor, sinks: int, window: int) -> torch.Tensor | None:
    """Indices (B, sinks + window), ascending, of the entries StreamingLLM keeps: the first ``sinks``
    real tokens and the last ``window`` entries of each row (``valid`` (B, N) False for padding).
    None when nothing is evicted (N <= sinks + window). Where a row has fewer real tokens than it
    could keep, padding entries fill the rest (they stay masked)."""
    n, keep = valid.shape[1], sinks + window
    if n <= keep:
        return None
    index = torch.arange(n, device=valid.device).expand_as(valid)
    wanted = (valid & (valid.cumsum(1) <= sinks)) | (index >= n - window)
    score = (2 * wanted.long() + valid.long()) * n + index
    return score.topk(keep, dim=1).indices.sort(dim=1).values


def slot_positions(valid: torch.Tensor) -> torch.Tensor:
    """Positions within the cache (sec. 3.2): each real entry's slot among the row's real entries,
    0, 1, 2 ...; padding entries get the slot of the real entry before them (they are masked)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


@dataclass(frozen=True)
class SinkPolicy(CachePolicy):
    """StreamingLLM's cache: ``sinks`` first tokens + the last ``window`` tokens, at cache positions."""

    sinks: int
    window: int

    def keep(self, valid: torch.Tensor) -> torch.Tensor | None:
        return sink_keep_indices(valid, self.sinks, self.window)

    def positions(self, absolute: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return slot_positions(valid)
