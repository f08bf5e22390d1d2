"""The report of a run directory: Markdown tables, CSV files and PNG plots from results.jsonl.

Works on any subset of cells (a partial or interrupted run): missing cells show as "–".
    RUN_DIR/report.md
    RUN_DIR/report/ppl.csv, passkey.csv, stream.csv
    RUN_DIR/report/ppl_vs_length_<model>.png, ppl_by_position_<model>_<length>.png, passkey_<model>.png,
                   stream_ppl_<model>.png, stream_cache_<model>.png
"""
from __future__ import annotations

import csv
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .results import CONFIG, ENV, RESULTS, ResultStore
from .spec import SLIDING

NOTE = ("How to read the perplexities: the sliding-window baseline scores every token with the model at "
        "its trained length (windows of the trained length), which is what ideal extrapolation would match "
        "(1.00x). A small model, such as the byte-level lab models, gains little from context beyond its "
        "window, so for it the criterion is staying flat -- PPL past the trained length close to the "
        "baseline -- not getting lower.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "model"


def _model_label(key: dict[str, Any], names: dict[str, set[str]]) -> str:
    name = Path(key["model"]["name"]).name or key["model"]["name"]
    if len(names[name]) > 1:
        name += f"@{key['model']['fingerprint'][:6]}"
    return name


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if value < 1000 else f"{value:.3g}"


def _length_header(length: int, trained: int) -> str:
    mult = length / trained
    rel = f"{mult:g}x"
    return f"**{length} ({rel}, trained)**" if length == trained else f"{length} ({rel})"


def _method_order(methods: list[str]) -> list[str]:
    seen = list(dict.fromkeys(methods))
    return [m for m in seen if m != SLIDING] + ([SLIDING] if SLIDING in seen else [])


def _table(rows: list[str], cols: list[int], trained: int, cell) -> list[str]:
    out = ["| method | " + " | ".join(_length_header(c, trained) for c in cols) + " |",
           "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        out.append(f"| {r} | " + " | ".join(cell(r, c) for c in cols) + " |")
    return out


def _params_summary(records: list[dict[str, Any]]) -> list[str]:
    by_method: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for rec in records:
        by_method[rec["key"]["method"]].append((rec["key"]["length"], rec["key"]["params"]))
    lines = []
    for method in _method_order(list(by_method)):
        items = sorted(by_method[method], key=lambda x: x[0])
        shown = "; ".join(f"{L}: " + (", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "-")
                          for L, p in items)
        lines.append(f"- `{method}` — {shown}")
    return lines


def _ppl_section(label: str, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    first = records[0]["key"]
    trained = first["trained_length"]
    methods = _method_order([r["key"]["method"] for r in records])
    lengths = sorted({r["key"]["length"] for r in records})
    cells = {(r["key"]["method"], r["key"]["length"]): r["result"] for r in records}
    base = {L: cells.get((SLIDING, L)) for L in lengths}

    def value(field):
        return lambda m, L: _fmt((cells.get((m, L)) or {}).get(field))

    def vs_baseline(m, L):
        res, ref = cells.get((m, L)), base.get(L)
        if not res or not ref or res.get("ppl_past") is None or not ref.get("ppl_past"):
            return "–"
        return f"{res['ppl_past'] / ref['ppl_past']:.2f}x"

    lines = [f"## Perplexity — {label}", "",
             f"Trained length {trained} tokens; mode `{first['mode']}`, {first['n_docs']} window(s) per cell, seed {first['seed']}; "
             f"the trained length's column is in bold.", ""]
    past = any(res.get("ppl_past") is not None for res in cells.values())
    if past:
        lines += ["**PPL of the tokens past the trained length** (predictions made at positions >= trained length):", ""]
        lines += _table(methods, lengths, trained, value("ppl_past"))
    else:
        lines += ["Every length is within the trained length: only whole-window PPL applies."]
    if past and base and any(base.values()):
        lines += ["", "**The same, relative to the sliding-window baseline** (1.00x = ideal extrapolation):", ""]
        lines += _table(methods, lengths, trained, vs_baseline)
    lines += ["", "**PPL over the whole window:**", ""]
    lines += _table(methods, lengths, trained, value("ppl"))
    lines += ["", "Parameters per length (every default made explicit):", ""] + _params_summary(records)
    plots = _plot_ppl(label, trained, methods, lengths, cells, out_dir)
    lines += [""] + [f"![{p.stem}](report/{p.name})" for p in plots]
    return lines + [""]


def _passkey_section(label: str, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    first = records[0]["key"]
    trained = first["trained_length"]
    methods = _method_order([r["key"]["method"] for r in records])
    lengths = sorted({r["key"]["length"] for r in records})
    depths = sorted({r["key"]["depth"] for r in records})
    by_ml: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        by_ml[(r["key"]["method"], r["key"]["length"])].append(r["result"])

    def mean(field):
        def cell(m, L):
            res = by_ml.get((m, L))
            if not res:
                return "–"
            n = sum(x["trials"] for x in res)
            return f"{100 * sum(x[field] * x['trials'] for x in res) / n:.0f}%"
        return cell

    keys = "1 key" if first["n_keys"] == 1 else f"{first['n_keys']} keys, one asked"
    lines = [f"## Passkey retrieval — {label}", "",
             f"Format `{first['format']}`, {keys}, {first['trials']} trials per (length, depth), depths "
             f"{', '.join(f'{d:g}' for d in depths)}; trained length {trained}.", "",
             "**Exact match** (all digits), averaged over depths:", ""]
    lines += _table(methods, lengths, trained, mean("exact"))
    lines += ["", "**Per-digit accuracy**, averaged over depths:", ""]
    lines += _table(methods, lengths, trained, mean("digit_acc"))
    lines += ["", "Parameters per length:", ""] + _params_summary([r for r in records if r["key"]["depth"] == depths[0]])
    grid = {(r["key"]["method"], r["key"]["length"], r["key"]["depth"]): r["result"]["exact"] for r in records}
    plot = _plot_passkey(label, methods, lengths, depths, trained, grid, out_dir)
    return lines + ["", f"![{plot.stem}](report/{plot.name})", ""]


def _group(records: list[dict[str, Any]], task: str, fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        k = r["key"]
        if k.get("task") == task:
            groups[(k["model"]["name"], k["model"]["fingerprint"]) + tuple(json.dumps(k.get(f), sort_keys=True) for f in fields)].append(r)
    return groups


PPL_GROUP = ("mode", "n_docs", "doc_stride", "seed", "buckets", "trained_length")
STREAM_GROUP = ("tokens", "bucket", "trained_length")
PASSKEY_GROUP = ("format", "n_keys", "trials", "seed", "trained_length")


def _ppl_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} ({k['mode']}, {k['n_docs']} doc(s), seed {k['seed']})"


def _passkey_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} ({k['format']}, {k['n_keys']} key(s), seed {k['seed']})"


def _ppl_summary(label: str, recs: list[dict[str, Any]]) -> list[str]:
    """One line: at the longest length with a baseline, plain and the best method vs the baseline."""
    cells = {(r["key"]["method"], r["key"]["length"]): r["result"] for r in recs}
    lengths = sorted({L for (m, L) in cells if m == SLIDING and cells[(m, L)].get("ppl_past")}, reverse=True)
    if not lengths:
        return []
    L, trained = lengths[0], recs[0]["key"]["trained_length"]
    ref = cells[(SLIDING, L)]["ppl_past"]
    others = {m: res["ppl_past"] for (m, l), res in cells.items() if l == L and m not in (SLIDING, "none") and res.get("ppl_past")}
    parts = [f"sliding-window baseline {ref:.2f}"]
    if ("none", L) in cells:
        parts.append(f"none (as trained) {cells[('none', L)]['ppl_past']:.2f} ({cells[('none', L)]['ppl_past'] / ref:.2f}x)")
    if others:
        best = min(others, key=others.get)
        parts.append(f"best method {best} {others[best]:.2f} ({others[best] / ref:.2f}x)")
    return [f"- **{label}**, PPL past the trained length at {L} tokens ({L / trained:g}x): " + "; ".join(parts) + "."]


def _passkey_summary(label: str, recs: list[dict[str, Any]]) -> list[str]:
    """One line: exact match per method at the longest length, best first."""
    L = max(r["key"]["length"] for r in recs)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in recs:
        if r["key"]["length"] == L:
            t = totals[r["key"]["method"]]
            t[0] += r["result"]["exact"] * r["result"]["trials"]
            t[1] += r["result"]["trials"]
    ranked = sorted(((100 * a / n, m) for m, (a, n) in totals.items()), reverse=True)
    trained = recs[0]["key"]["trained_length"]
    return [f"- **{label}**, passkey exact match at {L} tokens ({L / trained:g}x): "
            + ", ".join(f"{m} {v:.0f}%" for v, m in ranked) + "."]


def _stream_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} (streaming {k['tokens']} tokens)"


def _stream_rows(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{config label: the results of its documents}, in the order dense, window, sinks, sliding."""
    order = ("dense", "window", "sinks", "sliding")
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    kinds = {}
    for r in sorted(recs, key=lambda r: r["key"]["document"]):
        rows[r["key"]["label"]].append(r["result"])
        kinds[r["key"]["label"]] = r["key"]["config"]
    ranked = sorted(rows, key=lambda lab: (order.index(kinds[lab]) if kinds[lab] in order else len(order), lab))
    return {lab: rows[lab] for lab in ranked}


def _mean_nll(parts: list[tuple[float, int]]) -> float:
    """Token-weighted mean of (mean NLL, tokens) pairs."""
    return sum(v * n for v, n in parts) / sum(n for _, n in parts)


def _stream_buckets(results: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(bucket end, log PPL over the documents, cache MiB at the bucket end, largest over the documents)."""
    by_end: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for res in results:
        for b in res["buckets"]:
            by_end[b["end"]].append(b)
    return [(end, _mean_nll([(b["nll"], b["tokens"]) for b in bs]), max(b["cache_bytes"] for b in bs) / float(1 << 20))
            for end, bs in sorted(by_end.items())]


def _stream_section(label: str, recs: list[dict[str, Any]], out_dir: Path) -> list[str]:
    import math
    import statistics

    k = recs[0]["key"]
    rows = _stream_rows(recs)
    lines = [f"## Streaming perplexity — {label}", "",
             f"Each document fed one token at a time through the KV cache (StreamingLLM's eval_long_ppl); trained "
             f"length {k['trained_length']}; buckets of {k['bucket']} predictions. `sliding` recomputes over the last "
             f"S + W tokens without a cache; with `every K` only every K-th prediction is measured.", "",
             "| config | documents | PPL (all tokens) | PPL (last bucket) | peak cache MiB | median ms/token | tokens measured |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lab, results in rows.items():
        ppl = math.exp(_mean_nll([(r["nll"], r["tokens"]) for r in results]))
        last = math.exp(_mean_nll([(r["buckets"][-1]["nll"], r["buckets"][-1]["tokens"]) for r in results]))
        spread = ""
        if len(results) > 1:
            spread = f" ({_fmt(min(r['ppl'] for r in results))}–{_fmt(max(r['ppl'] for r in results))})"
        ms = statistics.median(r["ms_per_token_median"] for r in results)
        peak = max(r["cache_mib_peak"] for r in results)
        lines.append(f"| {lab} | {len(results)} | {_fmt(ppl)}{spread} | {_fmt(last)} | {peak:.3f} | {ms:.2f} | "
                     f"{sum(r['tokens'] for r in results)} |")
    if any(len(r) > 1 for r in rows.values()):
        lines += ["", "With several documents: PPL over all their tokens, (the documents' lowest–highest)."]
    plots = _plot_stream(label, k["trained_length"], {lab: _stream_buckets(res) for lab, res in rows.items()}, out_dir)
    return lines + [""] + [f"![{p.stem}](report/{p.name})" for p in plots] + [""]


def _stream_summary(label: str, recs: list[dict[str, Any]]) -> list[str]:
    """One line: PPL per config label, and sinks over sliding where both ran without a method."""
    import math

    rows = _stream_rows(recs)
    ppl = {lab: math.exp(_mean_nll([(r["nll"], r["tokens"]) for r in res])) for lab, res in rows.items()}
    kinds = {r["key"]["label"]: (r["key"]["config"], r["key"]["method"]) for r in recs}
    line = f"- **{label}**, streaming PPL: " + "; ".join(f"{lab} {_fmt(v)}" for lab, v in ppl.items())
    sinks = [lab for lab, kind in kinds.items() if kind == ("sinks", "none")]
    sliding = [lab for lab, kind in kinds.items() if kind == ("sliding", "none")]
    every = {r["key"]["label"]: r["key"].get("recompute_every", 1) for r in recs}
    if len(sinks) == 1 and len(sliding) == 1 and every[sliding[0]] == 1:
        line += f"; sinks / sliding {ppl[sinks[0]] / ppl[sliding[0]]:.2f}x"
    elif len(sliding) == 1:
        line += f" (sliding measured on every {every[sliding[0]]}-th prediction only: no ratio to the others)"
    return [line + "."]


COMMON_FIELDS = (("key", "task"), ("key", "model", "name"), ("key", "model", "fingerprint"), ("key", "method"),
                 ("key", "trained_length"))
TASK_FIELDS = {
    "ppl": (("key", "length"), ("result", "ppl"), ("result", "buckets")),
    "passkey": (("key", "length"), ("key", "depth"), ("key", "n_keys"), ("key", "format"), ("key", "trials"),
                ("result", "trials"), ("result", "exact"), ("result", "digit_acc")),
    "stream": (("key", "label"), ("key", "config"), ("key", "document"), ("result", "nll"), ("result", "tokens"),
               ("result", "buckets")),
}
BUCKET_FIELDS = {"ppl": ("start", "end", "ppl"), "stream": ("end", "nll", "tokens", "cache_bytes")}


def report_problem(record: dict[str, Any]) -> str | None:
    """Why the report cannot use ``record`` (a field it reads is missing), or None."""
    task = record["key"].get("task")
    for path in COMMON_FIELDS + TASK_FIELDS.get(task, ()):
        value: Any = record
        for part in path:
            if not isinstance(value, dict) or part not in value:
                return f"no {'.'.join(path)}"
            value = value[part]
    buckets = record["result"].get("buckets", [])
    needed = BUCKET_FIELDS.get(task, ())
    if not isinstance(buckets, list) or not all(isinstance(b, dict) and all(f in b for f in needed) for b in buckets):
        return f"result.buckets is not a list of objects with {', '.join(needed)}"
    return None


def write_report(run_dir: str | Path, repair: bool = False) -> Path:
    """Write report.md, CSVs and PNGs for ``run_dir`` (from whatever cells are stored); returns report.md.
    A record the report cannot read is an error naming its line; ``repair`` drops such records."""
    run = Path(run_dir).expanduser()
    if not (run / RESULTS).is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run directory: it has no {RESULTS}")
    records = ResultStore(run / RESULTS, repair=repair, check=report_problem).records()
    out_dir = run / "report"
    out_dir.mkdir(exist_ok=True)
    names: dict[str, set[str]] = defaultdict(set)
    for r in records:
        names[Path(r["key"]["model"]["name"]).name or r["key"]["model"]["name"]].add(r["key"]["model"]["fingerprint"])
    lines = ["# rope-ext evaluation report", "", f"Run directory `{run}`; {len(records)} cells; written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    env = run / ENV
    if env.is_file():
        e = json.loads(env.read_text())
        lines += [f"Environment: Python {e.get('python')}, torch {e.get('torch')}, transformers {e.get('transformers')}, "
                  f"rope-ext {e.get('rope_ext')}, {e.get('device')}, {e.get('threads')} thread(s) of {e.get('cpu_count')} cores.", ""]
    if (run / CONFIG).is_file():
        lines += [f"The exact configuration of every invocation: `{CONFIG}`.", ""]
    lines += [f"> {NOTE}", ""]
    ppl_groups = {_ppl_label(recs, names): recs for recs in _group(records, "ppl", PPL_GROUP).values()}
    pk_groups = {_passkey_label(recs, names): recs for recs in _group(records, "passkey", PASSKEY_GROUP).values()}
    summary = [line for label, recs in ppl_groups.items() for line in _ppl_summary(label, recs)]
    summary += [line for label, recs in pk_groups.items() for line in _passkey_summary(label, recs)]
    stream_groups = {_stream_label(recs, names): recs for recs in _group(records, "stream", STREAM_GROUP).values()}
    summary += [line for label, recs in stream_groups.items() for line in _stream_summary(label, recs)]
    if summary:
        lines += ["## Summary", ""] + summary + [""]
    for label, recs in ppl_groups.items():
        lines += _ppl_section(label, recs, out_dir)
    for label, recs in pk_groups.items():
        lines += _passkey_section(label, recs, out_dir)
    for label, recs in stream_groups.items():
        lines += _stream_section(label, recs, out_dir)
    if not records:
        lines += ["No finished cells yet.", ""]
    _write_csv(records, out_dir)
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def _write_csv(records: list[dict[str, Any]], out_dir: Path) -> None:
    ppl_cols = ["model", "fingerprint", "mode", "n_docs", "seed", "method", "params", "length", "trained_length",
                "ppl", "ppl_past", "ppl_within", "tokens", "tokens_past", "seconds"]
    pk_cols = ["model", "fingerprint", "format", "n_keys", "seed", "method", "params", "length", "trained_length",
               "depth", "trials", "exact", "digit_acc", "seconds"]
    stream_cols = ["model", "fingerprint", "config", "label", "method", "params", "sinks", "cache_window", "recompute_every",
                   "document", "positions", "tokens", "trained_length", "ppl", "ppl_last_bucket", "cache_mib_peak", "ms_per_token_median",
                   "measured", "seconds"]
    for task, cols in (("ppl", ppl_cols), ("passkey", pk_cols), ("stream", stream_cols)):
        with open(out_dir / f"{task}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            for r in records:
                k = r["key"]
                if k.get("task") != task:
                    continue
                row = {**k, **r["result"], "model": k["model"]["name"], "fingerprint": k["model"]["fingerprint"],
                       "params": json.dumps(k["params"], sort_keys=True), "seconds": r.get("meta", {}).get("seconds")}
                writer.writerow({c: row.get(c) for c in cols})


def _finish(fig, ax, path: Path) -> Path:
    """Plain numbers on log axes, legend, grid, tight layout; save the PNG."""
    plain = _plain_formatter()
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_ppl(label, trained, methods, lengths, cells, out_dir: Path) -> list[Path]:
    # a bare Figure, not pyplot: the caller's backend (a notebook's) is left alone
    from matplotlib.figure import Figure

    paths = []
    fig = Figure(figsize=(8.5, 4.5))
    ax = fig.subplots()
    for m in methods:
        pts = [(L, cells[(m, L)].get("ppl_past") or cells[(m, L)]["ppl"]) for L in lengths if (m, L) in cells]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m == SLIDING else "-")
    ax.axvline(trained, color="grey", linestyle=":", label=f"trained length ({trained})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L}\n{L / trained:g}x" for L in lengths])
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens, multiple of the trained length)")
    ax.set_ylabel("PPL past the trained length (whole window at <= trained)")
    ax.set_title(f"Perplexity vs length\n{label}", fontsize=10)
    paths.append(_finish(fig, ax, out_dir / f"ppl_vs_length_{_slug(label)}.png"))
    longest = max(L for (_, L) in cells)
    fig = Figure(figsize=(8.5, 4.5))
    ax = fig.subplots()
    for m in methods:
        res = cells.get((m, longest))
        if res:
            xs = [(b["start"] + b["end"] - 1) / 2 for b in res["buckets"]]
            ax.plot(xs, [b["ppl"] for b in res["buckets"]], marker=".", label=m, linestyle="--" if m == SLIDING else "-")
    if trained < longest:
        ax.axvline(trained, color="grey", linestyle=":", label=f"trained length ({trained})")
    ax.set_yscale("log")
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("PPL of the predictions in the bucket")
    ax.set_title(f"Perplexity by position at {longest} tokens\n{label}", fontsize=10)
    paths.append(_finish(fig, ax, out_dir / f"ppl_by_position_{_slug(label)}_{longest}.png"))
    return paths


def _plot_passkey(label, methods, lengths, depths, trained, grid, out_dir: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    n = len(methods)
    fig = Figure(figsize=(2.6 * n + 1.2, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    image = None
    for ax, m in zip(axes[0], methods):
        data = np.array([[grid.get((m, L, d), np.nan) for L in lengths] for d in depths], dtype=float)
        image = ax.imshow(100 * data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{L}\n{L / trained:g}x" for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length (tokens)")
        ax.set_title(m, fontsize=9)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{100 * data[i, j]:.0f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("key depth (0 = start)")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact match (%)")
    fig.suptitle(f"Passkey retrieval — {label}")
    path = out_dir / f"passkey_{_slug(label)}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_stream(label: str, trained: int, series: dict[str, list[tuple[int, float, float]]], out_dir: Path) -> list[Path]:
    """log PPL per bucket vs tokens streamed, and cache MiB vs tokens streamed, one line per config."""
    from matplotlib.figure import Figure

    paths = []
    for field, ylabel, title, name in ((1, "log PPL of the bucket (mean NLL, nats)", "Streaming log-perplexity", "stream_ppl"),
                                        (2, "KV cache at the bucket's end (MiB)", "KV cache memory", "stream_cache")):
        log_x = field == 1
        fig = Figure(figsize=(8.5, 4.5))
        ax = fig.subplots()
        for lab, pts in series.items():
            ax.plot([p[0] for p in pts], [p[field] for p in pts], marker=".",
                    linestyle="--" if lab.startswith("sliding") else "-", label=lab)
        ax.axvline(trained, color="grey", linestyle=":", label=f"trained length ({trained})")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(_plain_formatter())
        ax.set_xlabel("tokens streamed (end of the bucket" + (", log scale)" if log_x else ")"))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} vs tokens streamed\n{label}", fontsize=10)
        paths.append(_finish(fig, ax, out_dir / f"{name}_{_slug(label)}.png"))
    return paths


def _plain_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")
