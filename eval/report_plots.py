"""PNG plots of a run's results: perplexity vs length (with the paired ratio to the sliding-window
baseline), perplexity by position, passkey exact-match heat maps and streaming log-PPL / KV-cache
memory vs tokens streamed. Drawn on bare matplotlib Figures (the caller's pyplot backend is left
alone), 95% intervals as error bars, bands or cell text; ``rope_ext.eval.report`` calls them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .spec import SLIDING
from .report_intervals import exact_interval, ppl_interval, ratio_interval
from .stats import Interval, bootstrap_ppl


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "model"


def tokens_label(length: float) -> str:
    """2048 -> "2k", 131072 -> "128k", 1500 -> "1500": token counts as people write them."""
    length = int(round(length))
    if length >= 1 << 20 and length % (1 << 20) == 0:
        return f"{length >> 20}M"
    return f"{length >> 10}k" if length >= 1024 and length % 1024 == 0 else str(length)


def _plain(value: float, _pos: Any = None) -> str:
    """A tick label without exponents: 0.5, 8, 20, 1k, 50k."""
    if value >= 1000 and float(value / 1000).is_integer():
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _y_axis(ax, values: list[float], label: str) -> None:
    """Log y (ticks at 1, 2, 5 x 10^k -- more within a 20x span -- as plain numbers) when the values
    span more than 4x, else linear."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if v is not None and v > 0]
    span = max(values) / min(values) if values else 1.0
    if span > 4:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span > 20 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
        label += " (log scale)"
    ax.set_ylabel(label)


def _length_axis(ax, lengths: list[int], trained: int) -> None:
    """Log-2 x axis with a tick at each length, labelled in tokens (1k, 2k) and multiples (1x, 2x)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{tokens_label(L)}\n{L / trained:g}x" for L in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(lengths) > 1:
        ax.set_xlim(min(lengths) / 2 ** 0.35, max(lengths) * 2 ** 0.35)
    ax.set_xlabel("evaluation length (tokens; multiple of the trained length)")


def _finish(fig, axes, path: Path) -> Path:
    """Legend beside each axes, grid, tight layout; save the PNG."""
    for ax in axes:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def ppl_plot_text(has_past: bool, has_within: bool, trained: int) -> tuple[str, str]:
    """(title, y label) of the PPL-vs-length plot, true to what it shows: past-the-trained-length PPL
    where a length exceeds the trained one, whole-window PPL at lengths within it (open markers)."""
    if has_past and has_within:
        return (f"Perplexity vs length: past the trained length (filled, joined); whole window at <= {tokens_label(trained)} "
                "(open, not joined)", "PPL (filled: past the trained length;\nopen: whole window)")
    if has_past:
        return "Perplexity past the trained length vs evaluation length", "PPL of the predictions past the trained length"
    return (f"Perplexity vs length (every length within the trained length {tokens_label(trained)})",
            "PPL over the whole window")


def _errorbar(ax, pts: list[tuple[float, float, Interval | None]], **kw):
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    err = [[y - (iv.low if iv else y) for _, y, iv in pts], [(iv.high if iv else y) - y for _, y, iv in pts]]
    return ax.errorbar(xs, ys, yerr=err, capsize=3, elinewidth=1, **kw)


def plot_ppl(label: str, trained: int, methods: list[str], lengths: list[int],
             cells: dict[tuple[str, int], dict[str, Any]], out_dir: Path) -> list[Path]:
    return [_plot_ppl_vs_length(label, trained, methods, lengths, cells, out_dir),
            _plot_ppl_by_position(label, trained, methods, cells, out_dir)]


def _plot_ppl_vs_length(label: str, trained: int, methods: list[str], lengths: list[int],
                        cells: dict[tuple[str, int], dict[str, Any]], out_dir: Path) -> Path:
    """PPL vs length (past-the-trained-length PPL joined by lines; whole-window PPL at lengths within
    it as open markers, never joined to the other) and, below, the paired ratio to the baseline."""
    # a bare Figure, not pyplot: the caller's backend (a notebook's) is left alone
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D


    past_of = {key: r["result"].get("ppl_past") for key, r in cells.items()}
    has_past = any(v is not None for v in past_of.values())
    has_within = any(v is None for v in past_of.values())
    ratios = has_past and any(m == SLIDING and v is not None for (m, _), v in past_of.items())
    title, ylabel = ppl_plot_text(has_past, has_within, trained)
    fig = Figure(figsize=(9, 8 if ratios else 4.8))
    axes = fig.subplots(2 if ratios else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    values, ratio_values = [], []
    for i, m in enumerate(methods):
        color, style = f"C{i % 10}", "--" if m == SLIDING else "-"
        dodge = 2 ** (0.06 * (i - (len(methods) - 1) / 2))  # side by side, so that error bars do not hide each other
        past = [(L * dodge, r["result"]["ppl_past"], ppl_interval(r["result"], "_past"))
                for L in lengths if (r := cells.get((m, L))) and r["result"].get("ppl_past") is not None]
        whole = [(L * dodge, r["result"]["ppl"], ppl_interval(r["result"]))
                 for L in lengths if (r := cells.get((m, L))) and r["result"].get("ppl_past") is None]
        if past:
            _errorbar(ax, past, marker="o", color=color, linestyle=style, label=m)
        if whole:
            _errorbar(ax, whole, marker="s", markerfacecolor="none", color=color, linestyle="none" if has_past else style,
                      label=None if past else m)
        values += _extent(past + whole)
        if ratios and m != SLIDING:
            pts = [(L * dodge, r["result"]["ppl_past"] / b["result"]["ppl_past"], ratio_interval(r, b)) for L in lengths
                   if (r := cells.get((m, L))) and (b := cells.get((SLIDING, L))) and r["result"].get("ppl_past") is not None
                   and b["result"].get("ppl_past")]
            if pts:
                _errorbar(axes[1], pts, marker="o", color=color, linestyle=style, label=m)
                ratio_values += _extent(pts)
    if has_past and has_within:
        ax.add_line(Line2D([], [], marker="s", markerfacecolor="none", color="grey", linestyle="none",
                           label=f"open: whole-window PPL (length <= {tokens_label(trained)})"))
    for a in axes:
        if min(lengths) < trained < max(lengths):
            a.axvline(trained, color="grey", linestyle=":", label=f"trained length ({tokens_label(trained)})")
        _length_axis(a, lengths, trained)
    _y_axis(ax, values, ylabel + "; bars: 95% interval")
    if ratios:
        ax.set_xlabel("")
        axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=1, label="sliding-window baseline (1x)")
        _y_axis(axes[1], ratio_values + [1.0], "PPL past the trained length / baseline\n(bars: paired 95% interval)")
    ax.set_title(f"{title}\n{label}", fontsize=9)
    return _finish(fig, axes, out_dir / f"ppl_vs_length_{_slug(label)}.png")


def _extent(pts: list[tuple[float, float, Interval | None]]) -> list[float]:
    """The values and interval ends of plotted points (for the y axis's range)."""
    return [y for _, y, _ in pts] + [v for *_, iv in pts if iv for v in (iv.low, iv.high)]


def _plot_ppl_by_position(label: str, trained: int, methods: list[str], cells: dict[tuple[str, int], dict[str, Any]],
                          out_dir: Path) -> Path:
    """Per-bucket PPL along the window at the longest length, with bootstrap bands over windows."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    longest = max(L for (_, L) in cells)
    fig = Figure(figsize=(9, 4.8))
    ax = fig.subplots()
    values, banded = [], False
    for i, m in enumerate(methods):
        rec = cells.get((m, longest))
        if not rec:
            continue
        res = rec["result"]
        xs = [(b["start"] + b["end"] - 1) / 2 for b in res["buckets"]]
        ys = [b["ppl"] for b in res["buckets"]]
        ax.plot(xs, ys, marker=".", label=m, color=f"C{i % 10}", linestyle="--" if m == SLIDING else "-")
        values += ys
        docs = res.get("documents")
        if isinstance(docs, list) and len(docs) > 1:
            ivs = [bootstrap_ppl([d["bucket_nll_sums"][j] for d in docs], [b["end"] - b["start"]] * len(docs))
                   for j, b in enumerate(res["buckets"])]
            ax.fill_between(xs, [iv.low for iv in ivs], [iv.high for iv in ivs], color=f"C{i % 10}", alpha=0.12, linewidth=0)
            values += [iv.low for iv in ivs] + [iv.high for iv in ivs]
            banded = True
    past = trained < longest - 1
    if past:
        ax.axvline(trained, color="grey", linestyle=":", label=f"trained length ({tokens_label(trained)})")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("position in the window (tokens)")
    _y_axis(ax, values, "PPL of the predictions in the bucket" + ("; bands: 95% interval" if banded else ""))
    where = "" if past else f" (within the trained length {tokens_label(trained)})"
    ax.set_title(f"Perplexity by position at {tokens_label(longest)} tokens{where}\n{label}", fontsize=9)
    return _finish(fig, [ax], out_dir / f"ppl_by_position_{_slug(label)}_{longest}.png")


def plot_passkey(label: str, methods: list[str], lengths: list[int], depths: list[float], trained: int,
                 grid: dict[tuple[str, int, float], dict[str, Any]], out_dir: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure


    n = len(methods)
    fig = Figure(figsize=(2.8 * n + 1.2, 0.55 * len(depths) + 2.4))
    axes = fig.subplots(1, n, squeeze=False)
    image = None
    trials = set()
    for ax, m in zip(axes[0], methods):
        data = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                res = grid.get((m, L, d))
                if res is None:
                    continue
                iv = exact_interval([res])
                trials.add(iv.n)
                data[i, j] = iv.point
                ax.text(j, i, f"{100 * iv.point:.0f}\n{100 * iv.low:.0f}–{100 * iv.high:.0f}", ha="center", va="center", fontsize=6.5)
        image = ax.imshow(100 * data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{tokens_label(L)}\n{L / trained:g}x" for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length (tokens)")
        ax.set_title(m, fontsize=9)
    axes[0][0].set_ylabel("key depth (0 = start)")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact match (%)")
    shown = ", ".join(str(t) for t in sorted(trials))
    fig.suptitle(f"Passkey retrieval — {label}\nexact match % per cell and its 95% Wilson interval, n={shown} trials per cell",
                 fontsize=9)
    path = out_dir / f"passkey_{_slug(label)}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_stream(label: str, trained: int, series: dict[str, list[tuple]], out_dir: Path) -> list[Path]:
    """log PPL per bucket vs tokens streamed (bands: 95% interval over documents) and cache MiB vs
    tokens streamed, one line per config."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    paths = []
    longest = max(p[0] for pts in series.values() for p in pts)
    for field, ylabel, title, name in ((1, "log PPL of the bucket (mean NLL, nats)", "Streaming log-perplexity", "stream_ppl"),
                                        (2, "KV cache at the bucket's end (MiB)", "KV cache memory", "stream_cache")):
        log_x = field == 1
        fig = Figure(figsize=(8.5, 4.5))
        ax = fig.subplots()
        banded = False
        for i, (lab, pts) in enumerate(series.items()):
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[field] for p in pts], marker=".", color=f"C{i % 10}",
                    linestyle="--" if lab.startswith("sliding") else "-", label=lab)
            if field == 1 and all(p[3] is not None for p in pts):
                ax.fill_between(xs, [p[3] for p in pts], [p[4] for p in pts], color=f"C{i % 10}", alpha=0.15, linewidth=0)
                banded = True
        if trained < longest:
            ax.axvline(trained, color="grey", linestyle=":", label=f"trained length ({tokens_label(trained)})")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tokens_label(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens streamed (end of the bucket" + (", log scale)" if log_x else ")"))
        ax.set_ylabel(ylabel + ("; bands: 95% interval" if banded else ""))
        ax.set_title(f"{title} vs tokens streamed\n{label}", fontsize=10)
        paths.append(_finish(fig, [ax], out_dir / f"{name}_{_slug(label)}.png"))
    return paths
