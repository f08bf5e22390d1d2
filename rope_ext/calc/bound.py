"""Lower bound of the RoPE base for a context length (Men et al. 2024, "Base of RoPE Bounds Context
Length", arXiv 2405.14591, NeurIPS 2024).

Theorem 1 of the paper: for a query q and a random key k (i.i.d., standard deviation sigma) and a
similar key k* = q + eps, the attention a similar token gets over a random one at relative distance m is

    (E[q^T R_m k*] - E[q^T R_m k]) / (2 sigma^2) = B_{m,theta} = sum_{i=0}^{d/2-1} cos(m theta_i),
    theta_i = b^(-2i/d).

A base b supports a context length L when B_{m,theta} >= 0 for every m in 0..L. Feasibility is NOT
monotonic in b (Su 2024, https://kexue.fm/archives/10122: bisection fails), so the bound is found by
scanning a log-spaced grid of bases. One scan up to the largest L answers every smaller L: for each
base we record the first distance m with B < 0 (the paper's "inverse" direction: the longest context a
base supports), and b is feasible for L exactly when that distance exceeds L.

Above ``certified_base`` every base is feasible (proved below, no scan needed), which bounds the grid.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..lengths import parse_length
from ..validate import integer, number

# The paper's table of lower bounds for d = 128 (as reproduced by Su 2024), and Su's tighter re-scan
# of the same definition on a finer grid. Keys are L = 1k .. 1M with k = 1024.
PUBLISHED_BOUNDS_D128: dict[int, float] = {
    1024: 4.3e3, 2048: 1.6e4, 4096: 2.7e4, 8192: 8.4e4, 16384: 3.1e5, 32768: 6.4e5,
    65536: 2.1e6, 131072: 7.8e6, 262144: 3.6e7, 524288: 6.4e7, 1048576: 5.1e8,
}
SU_BOUNDS_D128: dict[int, float] = {
    1024: 4.3e3, 2048: 1.2e4, 4096: 2.7e4, 8192: 8.4e4, 16384: 2.3e5, 32768: 6.3e5,
    65536: 2.1e6, 131072: 4.9e6, 262144: 2.4e7, 524288: 5.8e7, 1048576: 6.5e7,
}

_INNER = 256            # distances per GEMM row: B(m0 + j) = cos(m0 theta) cos(j theta) - sin(m0 theta) sin(j theta)
_BUDGET = 1 << 22       # float64 elements of B held at once (32 MiB)
_FIRST_BLOCK = 4096     # distances scanned first; most bases below the bound fail inside it
_MAX_BLOCK = 1 << 18


def check_length(length: int | str, name: str = "length") -> int:
    """A context length in tokens, in rope_ext's one length syntax (``rope_ext.lengths``: 32768, 32k, 1M)."""
    return parse_length(length, None, name)


def check_head_dim(head_dim: int, name: str = "head_dim") -> int:
    """A positive even number of dimensions, at most 2^16 (``rope_ext.validate``)."""
    d = integer(head_dim, name, minimum=2, maximum=1 << 16)
    if d % 2:
        raise ValueError(f"{name} must be a positive even integer (2, 4, ..., e.g. 128), got {head_dim!r}")
    return d


def check_base(base: float, name: str = "base") -> float:
    """A finite RoPE base > 1 (``rope_ext.validate``; the calculator explores bases past any model's)."""
    return number(base, name, above=1)


def rope_theta(base: float | torch.Tensor, head_dim: int) -> torch.Tensor:
    """theta_i = b^(-2i/d), i = 0 .. d/2-1 (RoFormer eq. 15), in float64; ``base`` may be a 1-D tensor."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    b = torch.as_tensor(base, dtype=torch.float64)
    return b.reshape(-1, 1) ** (-2.0 * i / head_dim) if b.ndim else b ** (-2.0 * i / head_dim)


def similarity_margin(base: float, head_dim: int, distances: torch.Tensor) -> torch.Tensor:
    """B_{m,theta} = sum_i cos(m theta_i) at the given distances m (Men et al. 2024, Theorem 1)."""
    theta = rope_theta(check_base(base), check_head_dim(head_dim))
    return torch.cos(distances.to(torch.float64)[:, None] * theta).sum(-1)


def certified_feasible(base: float, head_dim: int, length: int) -> bool:
    """A sufficient condition for B_{m,theta} >= 0 on m = 0..L. For every i with L theta_i <= pi,
    cos(m theta_i) >= cos(L theta_i) (cos decreases on [0, pi]); every other term is >= -1. So
    sum_i [cos(L theta_i) if L theta_i <= pi else -1] >= 0 proves feasibility. The left side only grows
    with b (theta_i shrinks), so the condition is monotonic and can be bisected."""
    x = length * rope_theta(base, head_dim)
    return bool(torch.where(x <= math.pi, torch.cos(x), torch.full_like(x, -1.0)).sum() >= 0)


def certified_base(head_dim: int, length: int, cap: float = 1e30) -> float | None:
    """The smallest base (to 0.1 %) above which ``certified_feasible`` holds, or None below ``cap``
    (d <= 4 with long L: B can dip below zero for any base)."""
    if not certified_feasible(cap, head_dim, length):
        return None
    lo, hi = math.log(1.0 + 1e-9), math.log(cap)
    while hi - lo > 1e-3:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if certified_feasible(math.exp(mid), head_dim, length) else (mid, hi)
    return math.exp(hi)


def _first_negative_block(theta: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """For each row of ``theta`` (n_bases, d/2): the first m in [start, end) with B(m) < 0, else -1.
    B on the block is one batched GEMM: rows m0 = start + r * INNER, columns j = 0 .. INNER-1."""
    n = end - start
    rows = -(-n // _INNER)
    j = torch.arange(_INNER, dtype=torch.float64)
    m0 = start + _INNER * torch.arange(rows, dtype=torch.float64)
    inner = j[None, :, None] * theta[:, None, :]
    outer = m0[None, :, None] * theta[:, None, :]
    left = torch.cat([torch.cos(outer), torch.sin(outer)], dim=-1)
    right = torch.cat([torch.cos(inner), -torch.sin(inner)], dim=-1)
    margin = torch.bmm(left, right.transpose(1, 2))
    negative_rows = margin.amin(dim=2) < 0
    row = negative_rows.to(torch.uint8).argmax(dim=1)
    in_row = margin[torch.arange(theta.shape[0]), row] < 0
    first = start + _INNER * row + in_row.to(torch.uint8).argmax(dim=1)
    found = negative_rows.any(dim=1) & (first < end)
    return torch.where(found, first, torch.full_like(first, -1))


def first_negative_distance(bases: np.ndarray, head_dim: int, max_distance: int, progress: bool = False) -> np.ndarray:
    """For each base: the first relative distance m in 0..max_distance with B_{m,theta} < 0, or
    max_distance + 1 if there is none (the base supports every L <= max_distance)."""
    from tqdm.auto import tqdm

    theta = rope_theta(torch.as_tensor(np.asarray(bases, dtype=np.float64)), check_head_dim(head_dim))
    result = torch.full((theta.shape[0],), max_distance + 1, dtype=torch.int64)
    alive = torch.arange(theta.shape[0])
    start, block = 0, _FIRST_BLOCK
    with tqdm(total=max_distance + 1, unit="m", desc="base bound scan", disable=not progress, leave=False) as bar:
        while start <= max_distance and alive.numel():
            end = min(max_distance + 1, start + block)
            for batch in torch.split(alive, max(1, _BUDGET // (end - start))):
                first = _first_negative_block(theta[batch], start, end)
                hit = first >= 0
                result[batch[hit]] = first[hit]
            alive = alive[result[alive] > max_distance]
            bar.update(end - start)
            start, block = end, min(2 * block, _MAX_BLOCK)
    return result.numpy()


@dataclass(frozen=True)
class BaseBound:
    """The base lower bound for one context length, read off a scan. ``first_feasible`` is the
    smallest scanned base with B >= 0 on 0..L (the paper's definition, as tight as the grid);
    ``stable`` the smallest scanned base from which every larger scanned base is feasible;
    ``certified_above`` a base above which every base is feasible (proved, not scanned);
    ``feasible_islands`` the feasible base intervals of the grid below ``stable``."""

    length: int
    head_dim: int
    first_feasible: float | None
    stable: float | None
    certified_above: float | None
    feasible_islands: list[tuple[float, float]]
    grid: tuple[float, float, int]

    def to_dict(self) -> dict:
        published = PUBLISHED_BOUNDS_D128.get(self.length) if self.head_dim == 128 else None
        return {
            "length": self.length, "head_dim": self.head_dim, "first_feasible_base": self.first_feasible,
            "stable_base": self.stable, "certified_above": self.certified_above,
            "feasible_islands": [list(i) for i in self.feasible_islands],
            "grid": {"min_base": self.grid[0], "max_base": self.grid[1], "bases": self.grid[2]},
            "published_men_et_al_2024": published,
            "published_su_2024": SU_BOUNDS_D128.get(self.length) if self.head_dim == 128 else None,
        }


@dataclass(frozen=True)
class BaseScan:
    """A grid of bases and, for each, the first distance where B_{m,theta} < 0 (scanned to max_length)."""

    head_dim: int
    max_length: int
    bases: np.ndarray
    first_negative: np.ndarray = field(repr=False)

    def feasible(self, length: int) -> np.ndarray:
        if check_length(length) > self.max_length:
            raise ValueError(f"length {length} is beyond this scan (max_length {self.max_length}); scan again with a larger length")
        return self.first_negative > length

    def bound(self, length: int) -> BaseBound:
        ok = self.feasible(length)
        bad = np.flatnonzero(~ok)
        first = float(self.bases[np.argmax(ok)]) if ok.any() else None
        if not bad.size:
            stable_index = 0
        else:
            stable_index = int(bad[-1]) + 1 if bad[-1] + 1 < ok.size else None
        stable = float(self.bases[stable_index]) if stable_index is not None else None
        limit = stable_index if stable_index is not None else ok.size
        islands, k = [], 0
        while k < limit:
            if not ok[k]:
                k += 1
                continue
            end = k
            while end + 1 < limit and ok[end + 1]:
                end += 1
            islands.append((float(self.bases[k]), float(self.bases[end])))
            k = end + 1
        grid = (float(self.bases[0]), float(self.bases[-1]), int(self.bases.size))
        return BaseBound(length, self.head_dim, first, stable, certified_base(self.head_dim, length), islands, grid)


def base_grid(min_base: float, max_base: float, per_decade: int) -> np.ndarray:
    """Log-spaced bases from min_base to max_base with ``per_decade`` points per factor of 10."""
    lo, hi = check_base(min_base, "min_base"), check_base(max_base, "max_base")
    if hi <= lo:
        raise ValueError(f"max_base must be > min_base, got min_base={lo:g}, max_base={hi:g}")
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or not 1 <= per_decade <= 100_000:
        raise ValueError(f"per_decade must be an integer in 1..100000 (grid points per factor of 10), got {per_decade!r}")
    count = int(math.ceil(math.log10(hi / lo) * per_decade)) + 1
    return np.logspace(math.log10(lo), math.log10(hi), count)


def scan_bases(max_length: int, head_dim: int = 128, *, per_decade: int = 100, min_base: float = 2.0,
               max_base: float | None = None, progress: bool = False) -> BaseScan:
    """Scan a log grid of bases for every L <= max_length at once. ``max_base`` defaults to the
    certified base for max_length (so "stable" is also a proved statement about all larger bases);
    where no certificate exists below 1e30 (head_dim <= 4) the grid stops at 1e12."""
    max_length, head_dim = check_length(max_length, "max_length"), check_head_dim(head_dim)
    if max_base is None:
        certified = certified_base(head_dim, max_length)
        max_base = max(certified * 1.001, 2 * check_base(min_base, "min_base")) if certified is not None else 1e12
    bases = base_grid(min_base, max_base, per_decade)
    return BaseScan(head_dim, max_length, bases, first_negative_distance(bases, head_dim, max_length, progress))


def refine_bound(scan: BaseScan, length: int, points: int = 64, near: float = 0.75) -> BaseBound:
    """``scan.bound(length)`` with the feasible islands the grid stepped over looked for.

    Below the stable base the feasible bases can be islands narrower than a grid step (at L = 32k
    and d = 128 about 0.15 % wide, e.g. Su's 6.3e5). A base whose first negative distance is already
    past ``near * length`` sits close to one, so the grid intervals on both sides of every such base
    are rescanned with ``points`` bases each (up to ``length`` only). A search, not a proof: an island
    whose neighbours all fail early can still be missed; ``stable`` and ``certified_above`` are exact."""
    coarse = scan.bound(length)
    limit = scan.bases.size if coarse.stable is None else int(np.searchsorted(scan.bases, coarse.stable))
    close = [i for i in range(limit) if near * length < scan.first_negative[i] <= length]
    if not close:
        return coarse
    edges = sorted({j for i in close for j in (max(i - 1, 0), i, min(i + 1, scan.bases.size - 1))})
    grid = np.unique(np.concatenate([np.geomspace(scan.bases[a], scan.bases[b], points + 2)[1:-1]
                                     for a, b in zip(edges, edges[1:]) if b == a + 1]))
    found = grid[first_negative_distance(grid, scan.head_dim, length) > length]
    if not found.size:
        return coarse
    islands = sorted(coarse.feasible_islands + _runs(grid, found))
    first = float(found[0]) if coarse.first_feasible is None else min(coarse.first_feasible, float(found[0]))
    return dataclasses.replace(coarse, first_feasible=first, feasible_islands=islands)


def _runs(grid: np.ndarray, found: np.ndarray) -> list[tuple[float, float]]:
    """Maximal runs of consecutive grid bases that are in ``found``, as (first, last) pairs."""
    inside = np.isin(grid, found)
    runs, k = [], 0
    while k < grid.size:
        if inside[k]:
            end = k
            while end + 1 < grid.size and inside[end + 1]:
                end += 1
            runs.append((float(grid[k]), float(grid[end])))
            k = end + 1
        else:
            k += 1
    return runs


def base_lower_bounds(lengths: list[int], head_dim: int = 128, refine: bool = True, **scan_kwargs) -> list[BaseBound]:
    """``BaseBound`` for each context length, from one scan up to the largest; with ``refine`` the
    narrow islands between grid points are looked for (``refine_bound``)."""
    if not lengths:
        raise ValueError("lengths must name at least one context length (tokens)")
    checked = [check_length(n) for n in lengths]
    scan = scan_bases(max(checked), head_dim, **scan_kwargs)
    return [refine_bound(scan, n) if refine else scan.bound(n) for n in checked]


def base_lower_bound(length: int, head_dim: int = 128, refine: bool = True, **scan_kwargs) -> BaseBound:
    """The RoPE base lower bound for one context length (Men et al. 2024); see ``BaseBound``."""
    return base_lower_bounds([length], head_dim, refine, **scan_kwargs)[0]
