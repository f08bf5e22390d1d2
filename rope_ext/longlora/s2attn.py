"""S2-Attn, LongLoRA's shifted sparse attention (Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of
Long-Context Large Language Models", arXiv 2309.12307, sec. 3.2 and Algorithm 1).

Full causal attention at the fine-tuning length L costs O(L^2). S2-Attn splits the sequence into
groups of G tokens (G = L/4 by default) and attends causally inside each group, O(L G). In half of
the heads the groups are shifted by G/2, so the tokens on each side of a group border see each other
and information crosses every border as layers stack. Only training uses it: at inference the
model attends over the whole sequence, unchanged.

The shifted heads' two ends:
  * ``wrap=True`` -- the reference's eager code (``roll(-G/2)``): the last group holds the last G/2
    tokens followed by the first G/2, so the first G/2 tokens attend to the last ones, i.e. to future
    tokens at negative relative positions.
  * ``wrap=False`` -- the reference's flash-attention code (variable-length groups): the shifted
    groups are [0, G/2), [G/2, 3G/2), ..., [L - G/2, L); everything stays causal.

When G >= L there is one group and nothing to connect: S2-Attn is full causal attention.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Causal = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Run = tuple[int, int, int]


def group_runs(length: int, group_size: int, offset: int = 0) -> list[Run]:
    """Partition [0, length) into groups: one of ``offset`` tokens first (if offset > 0), then groups
    of ``group_size``, the last one shorter when they do not fit. Each run is (start, count, size):
    ``count`` consecutive groups of ``size`` tokens from ``start``."""
    runs = [(0, 1, offset)] if offset else []
    full = (length - offset) // group_size
    if full:
        runs.append((offset, full, group_size))
    rest = length - offset - full * group_size
    if rest:
        runs.append((offset + full * group_size, 1, rest))
    return runs


def _fold(x: torch.Tensor, run: Run) -> torch.Tensor:
    """(B, H, L, d) -> (B * count, H, size, d): the run's groups become batch entries."""
    start, count, size = run
    batch, heads, _, dim = x.shape
    part = x[:, :, start:start + count * size]
    return part.reshape(batch, heads, count, size, dim).transpose(1, 2).reshape(batch * count, heads, size, dim)


def grouped_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: Causal, runs: list[Run]) -> torch.Tensor:
    """Causal attention inside each group of ``runs`` -> (B, L, H, d). Groups of equal size go
    through ``causal`` together, as one batch."""
    batch = query.shape[0]
    pieces: dict[Run, torch.Tensor] = {}
    for size in sorted({run[2] for run in runs}):
        members = [run for run in runs if run[2] == size]
        q, k, v = (torch.cat([_fold(x, run) for run in members]) for x in (query, key, value))
        out = causal(q, k, v)
        for run, part in zip(members, out.split([batch * run[1] for run in members])):
            pieces[run] = part.reshape(batch, run[1] * run[2], *part.shape[2:])
    return torch.cat([pieces[run] for run in runs], dim=1)


def shifted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: Causal, group_size: int, wrap: bool) -> torch.Tensor:
    """Groups shifted by half a group (Algorithm 1's ``roll`` when ``wrap``) -> (B, L, H, d)."""
    half, length = group_size // 2, query.shape[2]
    if not wrap:
        return grouped_causal(query, key, value, causal, group_runs(length, group_size, offset=half))
    rolled = (x.roll(-half, dims=2) for x in (query, key, value))
    return grouped_causal(*rolled, causal, group_runs(length, group_size)).roll(half, dims=1)


def shifted_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: Causal,
                             group_size: int, shift: bool = True, wrap: bool = True) -> torch.Tensor:
    """S2-Attn (LongLoRA, sec. 3.2): causal attention inside groups of ``group_size`` tokens, the
    second half of the heads (heads H//2 ..) on groups shifted by group_size // 2.

    query (B, H, L, d) already rotated; key / value (B, Hkv, L, d) with the KV heads not repeated
    (GQA); ``causal(q, k, v) -> (B', L', H', d)`` is the model's attention with a plain causal mask.
    Returns (B, L, H, d). Where a KV head serves both halves (Hkv odd, e.g. multi-query attention)
    every head is computed both ways and each half keeps its own: exact, at twice the cost.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    heads, kv_heads, length = query.shape[1], key.shape[1], query.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if group_size >= length:
        return causal(query, key, value)
    plain_runs = group_runs(length, group_size)
    if not shift or group_size < 2:
        return grouped_causal(query, key, value, causal, plain_runs)
    split = heads // 2
    if kv_heads % 2 == 0:
        kv_split = kv_heads // 2
        plain = grouped_causal(query[:, :split], key[:, :kv_split], value[:, :kv_split], causal, plain_runs)
        moved = shifted(query[:, split:], key[:, kv_split:], value[:, kv_split:], causal, group_size, wrap)
    else:
        plain = grouped_causal(query, key, value, causal, plain_runs)[:, :, :split]
        moved = shifted(query, key, value, causal, group_size, wrap)[:, :, split:]
    return torch.cat([plain, moved], dim=2)


@dataclass(frozen=True)
class S2Attn:
    """The training-only attention pattern for ``rope_ext.patch(model, method, train_attention=...)``.

    ``group_size_ratio``: G = round(L * ratio) at each call's length L (LongLoRA: 1/4);
    ``group_size``: a fixed G instead; ``shift``: shift half of the heads (False: plain grouped
    attention, the paper's ablation); ``wrap``: the reference's roll (see the module docstring),
    off by default so training stays causal.
    """

    group_size_ratio: float = 0.25
    group_size: int | None = None
    shift: bool = True
    wrap: bool = False

    def __post_init__(self) -> None:
        ratio = self.group_size_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"S2Attn: group_size_ratio must be a number in (0, 1], got {ratio!r}")
        size = self.group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"S2Attn: group_size must be an integer >= 1 or None, got {size!r}")
        for name in ("shift", "wrap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"S2Attn: {name} must be True or False, got {getattr(self, name)!r}")

    def group_size_for(self, length: int) -> int:
        """G for a sequence of ``length`` tokens."""
        return self.group_size if self.group_size is not None else max(1, round(length * self.group_size_ratio))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: Causal) -> torch.Tensor:
        return shifted_sparse_attention(query, key, value, causal, self.group_size_for(query.shape[2]), self.shift, self.wrap)
