"""PNG plot of the RoPE base lower bound against the context length (Men et al. 2024)."""
from __future__ import annotations

import os
from pathlib import Path

from .bound import PUBLISHED_BOUNDS_D128, SU_BOUNDS_D128, BaseBound


def plot_base_bounds(bounds: list[BaseBound], path: str | os.PathLike, title: str | None = None) -> Path:
    """Log-log plot of the first feasible base, the stable base and the certified base against L,
    with the published points of Men et al. 2024 (and Su's re-scan) overlaid when head_dim is 128.
    The directory must exist. Drawn on a bare Figure, not pyplot, so the caller's backend is left alone."""
    from matplotlib.figure import Figure

    if not bounds:
        raise ValueError("nothing to plot: give at least one context length")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(path)!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory of the plot path does not exist: {str(out.parent)!r}")
    d = bounds[0].head_dim
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    series = [("first feasible base (scan)", "first_feasible", "o-"), ("stable base: every larger base feasible (scan)", "stable", "s--"),
              ("certified: proved feasible above", "certified_above", ":")]
    for label, attr, style in series:
        points = [(x.length, getattr(x, attr)) for x in bounds if getattr(x, attr) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    if d == 128:
        ax.plot(list(PUBLISHED_BOUNDS_D128), list(PUBLISHED_BOUNDS_D128.values()), "k*", markersize=10,
                label="published, Men et al. 2024 (d=128)")
        ax.plot(list(SU_BOUNDS_D128), list(SU_BOUNDS_D128.values()), "rx", label="Su 2024 re-scan (d=128)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (tokens)")
    ax.set_ylabel("RoPE base b (lower bound)")
    ax.set_title(title or f"RoPE base lower bound, head_dim {d}: sum_i cos(m b^(-2i/d)) >= 0 for all m <= L", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out
