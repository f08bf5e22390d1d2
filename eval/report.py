"""The report of a run directory: Markdown tables, CSV files and PNG plots (``report_plots``) from results.jsonl.

RULER-style records (``rope_ext.eval.ruler``) get their own part (``rope_ext.eval.ruler_report``).
Works on any subset of cells (a partial or interrupted run): missing cells show as "–". Beside each
figure: n (windows, trials or documents) and its 95% interval (``rope_ext.eval.stats``): a bootstrap
over the windows a record keeps for perplexities, paired by window for ratios, Wilson's interval for
exact-match accuracy. A method is called better than another only when those intervals separate.
Records written before per-window values were kept still report, marked "no per-document values:
rerun to get intervals".
    RUN_DIR/report.md
    RUN_DIR/report/ppl.csv, passkey.csv, stream.csv, ruler.csv (one row per case)
    RUN_DIR/report/ppl_vs_length_<model>.png, ppl_by_position_<model>_<length>.png, passkey_<model>.png,
                   stream_ppl_<model>.png, stream_cache_<model>.png
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report_intervals import digit_interval, documents, exact_interval, ppl_interval, ratio_interval, successes
from .report_plots import plot_passkey, plot_ppl, plot_stream
from .results import CONFIG, ENV, RESULTS, ResultStore
from .ruler_report import CSV_COLUMNS as RULER_COLUMNS
from .ruler_report import case_problem, csv_rows, one_per_prompt, ruler_section, ruler_summary
from .spec import SLIDING
from .stats import DRAWS, SEED, Interval, bootstrap_ppl, bootstrap_ratio, separated

NOTE = ("How to read the perplexities: the sliding-window baseline scores every token with the model at "
        "its trained length (windows of the trained length), which is what ideal extrapolation would match "
        "(1.00x). A small model, such as the byte-level lab models, gains little from context beyond its "
        "window, so for it the criterion is staying flat -- PPL past the trained length close to the "
        "baseline -- not getting lower.")
SPREAD = (f"How to read the intervals: in brackets the 95% interval -- for a perplexity a percentile bootstrap over "
          f"the windows (documents) of the cell ({DRAWS} draws, seed {SEED}), for a ratio the same paired by window, "
          f"for exact match Wilson's score interval over the trials. With few windows the bootstrap understates the "
          f"spread. A method is called better than another only when the paired ratio's interval excludes 1 "
          f"(accuracies: when the Wilson intervals do not overlap).")
NO_DOCS = "no per-document values: rerun to get intervals"
MARK = "†"


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
    rel = f"{length / trained:g}x"
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


def _no_interval(*results: dict[str, Any]) -> str:
    """Why a figure of these results has no interval."""
    if any(documents(r) is None for r in results):
        return NO_DOCS
    return "one window: no interval (n=1)"


def _ci(iv: Interval, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    return f"({iv.low * scale:.{digits}f}–{iv.high * scale:.{digits}f}{unit})"


def _ppl_cell(rec: dict[str, Any] | None, part: str) -> str:
    value = None if rec is None else rec["result"].get("ppl" + part)
    if value is None:
        return "–"
    iv = ppl_interval(rec["result"], part)
    if iv is not None:
        return f"{_fmt(value)} ({_fmt(iv.low)}–{_fmt(iv.high)})"
    return _fmt(value) + ("" if documents(rec["result"]) else f" {MARK}")


def _ratio_cell(rec: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    if not rec or not ref or rec["result"].get("ppl_past") is None or not ref["result"].get("ppl_past"):
        return "–"
    text = f"{rec['result']['ppl_past'] / ref['result']['ppl_past']:.2f}x"
    if rec is ref:
        return text
    iv = ratio_interval(rec, ref)
    if iv is not None:
        return f"{text} {_ci(iv)}"
    return text + ("" if documents(rec["result"]) and documents(ref["result"]) else f" {MARK}")


def _versus(iv: Interval, other: str) -> str:
    """How a paired ratio to ``other`` reads: above, below, or not distinguishable at n."""
    if iv.low > 1:
        return f"above {other}"
    if iv.high < 1:
        return f"below {other}"
    return f"not distinguishable from {other} at n={iv.n}"


# --- perplexity ----------------------------------------------------------------------------------

def _ppl_cells(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["key"]["method"], r["key"]["length"]): r for r in records}


def _n_caption(records: list[dict[str, Any]], n: int, unit: str, more: str) -> list[str]:
    if n == 1:
        lines = [f"n = 1 {unit} per cell: no intervals (a bootstrap needs at least 2 {unit}s; {more}); no method is ranked."]
    else:
        lines = [f"n = {n} {unit}s per cell; in brackets the 95% interval (bootstrap over the {unit}s; ratios paired by {unit})."]
    if any(documents(r["result"]) is None for r in records):
        lines.append(f"{MARK} {NO_DOCS}.")
    return lines


def _ppl_section(label: str, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    first = records[0]["key"]
    trained = first["trained_length"]
    methods = _method_order([r["key"]["method"] for r in records])
    lengths = sorted({r["key"]["length"] for r in records})
    cells = _ppl_cells(records)
    base = {L: cells.get((SLIDING, L)) for L in lengths}
    lines = [f"## Perplexity — {label}", "",
             f"Trained length {trained} tokens; mode `{first['mode']}`, seed {first['seed']}; the trained length's column is in bold.",
             *_n_caption(records, first["n_docs"], "window", "rerun with --docs 4 or more"), ""]
    past = any(r["result"].get("ppl_past") is not None for r in records)
    if past:
        lines += ["**PPL of the tokens past the trained length** (predictions made at positions >= trained length):", ""]
        lines += _table(methods, lengths, trained, lambda m, L: _ppl_cell(cells.get((m, L)), "_past"))
    else:
        lines += ["Every length is within the trained length: only whole-window PPL applies."]
    if past and any(base.values()):
        lines += ["", "**The same, relative to the sliding-window baseline** (1.00x = ideal extrapolation; paired by window):", ""]
        lines += _table(methods, lengths, trained, lambda m, L: _ratio_cell(cells.get((m, L)), base.get(L)))
    lines += ["", "**PPL over the whole window:**", ""]
    lines += _table(methods, lengths, trained, lambda m, L: _ppl_cell(cells.get((m, L)), ""))
    lines += ["", "Parameters per length (every default made explicit):", ""] + _params_summary(records)
    plots = plot_ppl(label, trained, methods, lengths, cells, out_dir)
    lines += [""] + [f"![{p.stem}](report/{p.name})" for p in plots]
    return lines + [""]


def _ppl_ranking(cells: dict[tuple[str, int], dict[str, Any]], methods: list[str], L: int) -> str:
    """"Best method: X ..." only when X's PPL is below every other's with a paired interval excluding 1;
    otherwise which methods it is not distinguishable from, or why nothing is ranked."""
    order = sorted(methods, key=lambda m: cells[(m, L)]["result"]["ppl_past"])
    if len(order) < 2:
        return ""
    best = order[0]
    ivs = {m: ratio_interval(cells[(best, L)], cells[(m, L)]) for m in order[1:]}
    missing = [m for m, iv in ivs.items() if iv is None]
    if missing:
        return f"No method is ranked: {_no_interval(*(cells[(m, L)]['result'] for m in [best, *missing]))}."
    ties = [m for m, iv in ivs.items() if iv.high >= 1]
    if not ties:
        nxt = order[1]
        return (f"Best method: {best} (PPL below every other method's; to the next, {nxt}, paired ratio "
                f"{ivs[nxt].point:.2f}x {_ci(ivs[nxt])}, n={ivs[nxt].n}).")
    shown = ", ".join(f"{m} (paired ratio {best} / {m} {ivs[m].point:.2f}x {_ci(ivs[m])})" for m in ties)
    return f"{best} has the lowest point estimate but is not distinguishable at n={ivs[ties[0]].n} from {shown}: no method is ranked."


def _ppl_summary(label: str, recs: list[dict[str, Any]]) -> list[str]:
    """One line: at the longest length with a baseline, each method against the baseline (paired
    interval), and a best method only when the intervals say so."""
    cells = _ppl_cells(recs)
    lengths = sorted({L for (m, L), r in cells.items() if m == SLIDING and r["result"].get("ppl_past")}, reverse=True)
    if not lengths:
        return []
    L, trained = lengths[0], recs[0]["key"]["trained_length"]
    ref = cells[(SLIDING, L)]
    methods = [m for m in _method_order([m for m, _ in cells]) if m != SLIDING and cells.get((m, L))
               and cells[(m, L)]["result"].get("ppl_past")]
    parts = [f"sliding-window baseline {_ppl_cell(ref, '_past')}"]
    for m in methods:
        rec = cells[(m, L)]
        text = f"{m} {_fmt(rec['result']['ppl_past'])} = {rec['result']['ppl_past'] / ref['result']['ppl_past']:.2f}x the baseline"
        iv = ratio_interval(rec, ref)
        parts.append(f"{text} ({_no_interval(rec['result'], ref['result'])})" if iv is None
                     else f"{text} {_ci(iv)}, {_versus(iv, 'the baseline')}")
    n = len(documents(ref["result"]) or []) or recs[0]["key"]["n_docs"]
    line = (f"- **{label}**, PPL past the trained length at {L} tokens ({L / trained:g}x), n={n} window(s): "
            + "; ".join(parts) + ".")
    ranking = _ppl_ranking(cells, methods, L)
    return [line + (f" {ranking}" if ranking else "")]


# --- passkey -------------------------------------------------------------------------------------

def _passkey_section(label: str, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    first = records[0]["key"]
    trained = first["trained_length"]
    methods = _method_order([r["key"]["method"] for r in records])
    lengths = sorted({r["key"]["length"] for r in records})
    depths = sorted({r["key"]["depth"] for r in records})
    by_ml: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        by_ml[(r["key"]["method"], r["key"]["length"])].append(r["result"])

    def exact(m: str, L: int) -> str:
        res = by_ml.get((m, L))
        if not res:
            return "–"
        iv = exact_interval(res)
        return f"{100 * iv.point:.0f}% {_ci(iv, 0, 100)}, n={iv.n}"

    def digits(m: str, L: int) -> str:
        res = by_ml.get((m, L))
        if not res:
            return "–"
        acc = sum(x["digit_acc"] * x["trials"] for x in res) / sum(x["trials"] for x in res)
        iv = digit_interval(res)
        return f"{100 * acc:.0f}%" + (f" {_ci(iv, 0, 100)}" if iv else f" {MARK}")

    keys = "1 key" if first["n_keys"] == 1 else f"{first['n_keys']} keys, one asked"
    lines = [f"## Passkey retrieval — {label}", "",
             f"Format `{first['format']}`, {keys}, {first['trials']} trials per (length, depth), depths "
             f"{', '.join(f'{d:g}' for d in depths)}; trained length {trained}. n = the trials of a (method, length) "
             f"over its depths; in brackets the 95% interval (Wilson for exact match, a bootstrap over trials for digits).", "",
             "**Exact match** (all digits), over depths:", ""]
    lines += _table(methods, lengths, trained, exact)
    lines += ["", "**Per-digit accuracy**, over depths:", ""]
    lines += _table(methods, lengths, trained, digits)
    lines += _passkey_depths(records, methods, lengths, depths, trained)
    if any(digit_interval([r["result"]]) is None for r in records):
        lines += ["", f"{MARK} no per-trial outcomes: rerun to get intervals."]
    lines += ["", "Parameters per length:", ""] + _params_summary([r for r in records if r["key"]["depth"] == depths[0]])
    grid = {(r["key"]["method"], r["key"]["length"], r["key"]["depth"]): r["result"] for r in records}
    plot = plot_passkey(label, methods, lengths, depths, trained, grid, out_dir)
    return lines + ["", f"![{plot.stem}](report/{plot.name})", ""]


def _passkey_depths(records: list[dict[str, Any]], methods: list[str], lengths: list[int], depths: list[float],
                    trained: int) -> list[str]:
    """Per length, a table method x depth of the exact match with its Wilson interval and n."""
    cells = {(r["key"]["method"], r["key"]["length"], r["key"]["depth"]): r["result"] for r in records}
    lines = []
    for L in lengths:
        lines += ["", f"**Exact match per depth** at {L} tokens ({L / trained:g}x):", "",
                  "| method | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
                  "| --- | " + " | ".join("---:" for _ in depths) + " |"]
        for m in methods:
            row = []
            for d in depths:
                res = cells.get((m, L, d))
                iv = exact_interval([res]) if res else None
                row.append(f"{100 * iv.point:.0f}% {_ci(iv, 0, 100)}, n={iv.n}" if iv else "–")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


def _passkey_summary(label: str, recs: list[dict[str, Any]]) -> list[str]:
    """One line: exact match per method at the longest length with its Wilson interval; a best method
    only when its interval lies above every other's."""
    L = max(r["key"]["length"] for r in recs)
    results: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        if r["key"]["length"] == L:
            results[r["key"]["method"]].append(r["result"])
    ivs = {m: exact_interval(results[m]) for m in _method_order(list(results))}
    trained = recs[0]["key"]["trained_length"]
    line = (f"- **{label}**, passkey exact match at {L} tokens ({L / trained:g}x): "
            + ", ".join(f"{m} {100 * iv.point:.0f}% {_ci(iv, 0, 100, '%')} n={iv.n}" for m, iv in ivs.items()) + ".")
    if len(ivs) > 1:
        best = max(ivs, key=lambda m: ivs[m].point)
        ties = [m for m in ivs if m != best and not separated(ivs[best], ivs[m])]
        if not ties:
            line += f" Best method: {best} (its interval lies above every other's)."
        else:
            line += (f" {best} has the highest point estimate but is not distinguishable from {', '.join(ties)} "
                     f"at n={ivs[best].n} trials: no method is ranked.")
    return [line]


# --- streaming -----------------------------------------------------------------------------------

def _stream_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} (streaming {k['tokens']} tokens)"


def _stream_rows(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{config label: its records, by document}, in the order dense, window, sinks, sliding."""
    order = ("dense", "window", "sinks", "sliding")
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    kinds = {}
    for r in sorted(recs, key=lambda r: r["key"]["document"]):
        rows[r["key"]["label"]].append(r)
        kinds[r["key"]["label"]] = r["key"]["config"]
    ranked = sorted(rows, key=lambda lab: (order.index(kinds[lab]) if kinds[lab] in order else len(order), lab))
    return {lab: rows[lab] for lab in ranked}


def _sums(parts: list[dict[str, Any]]) -> tuple[list[float], list[int]]:
    """NLL sums and token counts of results (or buckets) that keep a mean NLL and a token count."""
    return [p["nll"] * p["tokens"] for p in parts], [p["tokens"] for p in parts]


def _stream_ppl(parts: list[dict[str, Any]]) -> tuple[float, Interval | None]:
    """PPL over every token of ``parts`` (one per document) and its bootstrap interval over documents."""
    sums, tokens = _sums(parts)
    point = math.exp(math.fsum(sums) / sum(tokens))
    return point, (bootstrap_ppl(sums, tokens) if len(parts) > 1 else None)


def _stream_buckets(recs: list[dict[str, Any]]) -> list[tuple[int, float, float, float | None, float | None]]:
    """(bucket end, log PPL over the documents, cache MiB at the bucket end (largest over the
    documents), and the log-PPL interval's low and high over documents, None with one document)."""
    by_end: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        for b in r["result"]["buckets"]:
            by_end[b["end"]].append(b)
    out = []
    for end, bs in sorted(by_end.items()):
        point, iv = _stream_ppl(bs)
        out.append((end, math.log(point), max(b["cache_bytes"] for b in bs) / float(1 << 20),
                    math.log(iv.low) if iv else None, math.log(iv.high) if iv else None))
    return out


def _stream_section(label: str, recs: list[dict[str, Any]], out_dir: Path) -> list[str]:
    k = recs[0]["key"]
    rows = _stream_rows(recs)
    lines = [f"## Streaming perplexity — {label}", "",
             f"Each document fed one token at a time through the KV cache (StreamingLLM's eval_long_ppl); trained "
             f"length {k['trained_length']}; buckets of {k['bucket']} predictions. `sliding` recomputes over the last "
             f"S + W tokens without a cache; with `every K` only every K-th prediction is measured. With several "
             f"documents, in brackets the 95% interval (bootstrap over documents).", "",
             "| config | documents | PPL (all tokens) | PPL (last bucket) | peak cache MiB | median ms/token | tokens measured |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lab, group in rows.items():
        results = [r["result"] for r in group]
        cols = []
        for parts in (results, [r["buckets"][-1] for r in results]):
            point, iv = _stream_ppl(parts)
            cols.append(_fmt(point) + (f" ({_fmt(iv.low)}–{_fmt(iv.high)})" if iv else ""))
        ms = statistics.median(r["ms_per_token_median"] for r in results)
        peak = max(r["cache_mib_peak"] for r in results)
        lines.append(f"| {lab} | {len(results)} | {cols[0]} | {cols[1]} | {peak:.3f} | {ms:.2f} | "
                     f"{sum(r['tokens'] for r in results)} |")
    plots = plot_stream(label, k["trained_length"], {lab: _stream_buckets(group) for lab, group in rows.items()}, out_dir)
    return lines + [""] + [f"![{p.stem}](report/{p.name})" for p in plots] + [""]


def _stream_summary(label: str, recs: list[dict[str, Any]]) -> list[str]:
    """One line: PPL per config label, and sinks over sliding (paired by document) where both ran
    without a method and sliding measured every prediction."""
    rows = _stream_rows(recs)
    ppl = {lab: _stream_ppl([r["result"] for r in group]) for lab, group in rows.items()}
    line = f"- **{label}**, streaming PPL: " + "; ".join(
        f"{lab} {_fmt(v)}" + (f" ({_fmt(iv.low)}–{_fmt(iv.high)})" if iv else "") for lab, (v, iv) in ppl.items())
    kinds = {r["key"]["label"]: (r["key"]["config"], r["key"]["method"]) for r in recs}
    sinks = [lab for lab, kind in kinds.items() if kind == ("sinks", "none")]
    sliding = [lab for lab, kind in kinds.items() if kind == ("sliding", "none")]
    every = {r["key"]["label"]: r["key"].get("recompute_every", 1) for r in recs}
    if len(sinks) == 1 and len(sliding) == 1 and every[sliding[0]] == 1:
        a, b = rows[sinks[0]], rows[sliding[0]]
        line += f"; sinks / sliding {ppl[sinks[0]][0] / ppl[sliding[0]][0]:.2f}x"
        paired = [x["key"]["sample"] for x in a] == [y["key"]["sample"] for y in b]
        if paired and len(a) > 1:
            iv = bootstrap_ratio(*_sums([x["result"] for x in a]), *_sums([y["result"] for y in b]))
            line += f" {_ci(iv)}, paired by document, n={iv.n}"
        else:
            line += f" (n={len(a)} document(s): no interval)"
    elif len(sliding) == 1:
        line += f" (sliding measured on every {every[sliding[0]]}-th prediction only: no ratio to the others)"
    return [line + "."]


# --- the report ----------------------------------------------------------------------------------

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
RULER_GROUP = ("seed", "trained_length", "generator")


def _ppl_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} ({k['mode']}, {k['n_docs']} doc(s), seed {k['seed']})"


def _ruler_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} (seed {k['seed']})"


def _passkey_label(recs: list[dict[str, Any]], names: dict[str, set[str]]) -> str:
    k = recs[0]["key"]
    return f"{_model_label(k, names)} ({k['format']}, {k['n_keys']} key(s), seed {k['seed']})"


COMMON_FIELDS = (("key", "task"), ("key", "model", "name"), ("key", "model", "fingerprint"), ("key", "method"),
                 ("key", "trained_length"))
TASK_FIELDS = {
    "ppl": (("key", "length"), ("result", "ppl"), ("result", "buckets")),
    "passkey": (("key", "length"), ("key", "depth"), ("key", "n_keys"), ("key", "format"), ("key", "trials"),
                ("result", "trials"), ("result", "exact"), ("result", "digit_acc")),
    "stream": (("key", "label"), ("key", "config"), ("key", "document"), ("result", "nll"), ("result", "tokens"),
               ("result", "buckets")),
    "ruler": (("key", "length"), ("key", "ruler_task"), ("key", "params"), ("key", "asked"), ("result", "cases"), ("result", "score")),
}
BUCKET_FIELDS = {"ppl": ("start", "end", "ppl"), "stream": ("end", "nll", "tokens", "cache_bytes")}
DOCUMENT_FIELDS = {"ppl": ("nll_sum", "tokens", "nll_sum_past", "tokens_past", "nll_sum_within", "tokens_within", "bucket_nll_sums")}
OUTCOME_FIELDS = ("correct", "digits")


def report_problem(record: dict[str, Any]) -> str | None:
    """Why the report cannot use ``record`` (a field it reads is missing), or None. Per-window values
    ("documents") and per-trial outcomes are optional (older records have none), but when present
    must be complete."""
    task = record["key"].get("task")
    for path in COMMON_FIELDS + TASK_FIELDS.get(task, ()):
        value: Any = record
        for part in path:
            if not isinstance(value, dict) or part not in value:
                return f"no {'.'.join(path)}"
            value = value[part]
    result = record["result"]
    buckets = result.get("buckets", [])
    needed = BUCKET_FIELDS.get(task, ())
    if not isinstance(buckets, list) or not all(isinstance(b, dict) and all(f in b for f in needed) for b in buckets):
        return f"result.buckets is not a list of objects with {', '.join(needed)}"
    fields = DOCUMENT_FIELDS.get(task, ())
    if "documents" in result:
        docs = result["documents"]
        if not isinstance(docs, list) or not all(isinstance(d, dict) and all(f in d for f in fields) for d in docs):
            return f"result.documents is not a list of objects with {', '.join(fields)}"
        if any(len(d["bucket_nll_sums"]) != len(buckets) for d in docs):
            return "result.documents' bucket_nll_sums do not match result.buckets"
    if task == "ruler":
        return case_problem(result)
    if task == "passkey" and "outcomes" in result:
        outcomes = result["outcomes"]
        if not isinstance(outcomes, list) or not all(isinstance(o, dict) and all(f in o for f in OUTCOME_FIELDS) for o in outcomes):
            return f"result.outcomes is not a list of objects with {', '.join(OUTCOME_FIELDS)}"
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
    lines += [f"> {NOTE}", ">", f"> {SPREAD}", ""]
    ppl_groups = {_ppl_label(recs, names): recs for recs in _group(records, "ppl", PPL_GROUP).values()}
    pk_groups = {_passkey_label(recs, names): recs for recs in _group(records, "passkey", PASSKEY_GROUP).values()}
    stream_groups = {_stream_label(recs, names): recs for recs in _group(records, "stream", STREAM_GROUP).values()}
    ruler_groups = {_ruler_label(recs, names): one_per_prompt(recs) for recs in _group(records, "ruler", RULER_GROUP).values()}
    ruler_methods = {label: _method_order([r["key"]["method"] for r in recs]) for label, recs in ruler_groups.items()}
    summary = [line for label, recs in ppl_groups.items() for line in _ppl_summary(label, recs)]
    summary += [line for label, recs in pk_groups.items() for line in _passkey_summary(label, recs)]
    summary += [line for label, recs in stream_groups.items() for line in _stream_summary(label, recs)]
    summary += [line for label, recs in ruler_groups.items() for line in ruler_summary(label, recs, ruler_methods[label])]
    if summary:
        lines += ["## Summary", ""] + summary + [""]
    for label, recs in ppl_groups.items():
        lines += _ppl_section(label, recs, out_dir)
    for label, recs in pk_groups.items():
        lines += _passkey_section(label, recs, out_dir)
    for label, recs in stream_groups.items():
        lines += _stream_section(label, recs, out_dir)
    for label, recs in ruler_groups.items():
        one = {(r["key"]["method"], r["key"]["length"]): r for r in recs}
        lines += ruler_section(label, recs, ruler_methods[label], _table)
        lines += ["Parameters per length:", ""] + _params_summary(list(one.values())) + [""]
    if not records:
        lines += ["No finished cells yet.", ""]
    _write_csv(records, out_dir)
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def _interval_columns(rec: dict[str, Any], baselines: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """The CSV's interval columns of a PPL record (empty where there is none, and why)."""
    res, k = rec["result"], rec["key"]
    docs = documents(res)
    row: dict[str, Any] = {"n": len(docs) if docs else None}
    for part in ("", "_past"):
        iv = ppl_interval(res, part)
        row[f"ppl{part}_low"], row[f"ppl{part}_high"] = (iv.low, iv.high) if iv else (None, None)
    ref = baselines.get((k["model"]["fingerprint"], k.get("sample"), k["length"]))
    if ref is not None and res.get("ppl_past") is not None and ref["result"].get("ppl_past"):
        row["past_vs_baseline"] = res["ppl_past"] / ref["result"]["ppl_past"]
        iv = None if ref is rec else ratio_interval(rec, ref)
        row["past_vs_baseline_low"], row["past_vs_baseline_high"] = (iv.low, iv.high) if iv else (None, None)
    row["interval_note"] = "" if docs and len(docs) > 1 else _no_interval(res)
    return row


def _write_csv(records: list[dict[str, Any]], out_dir: Path) -> None:
    ppl_cols = ["model", "fingerprint", "mode", "n_docs", "seed", "method", "params", "length", "trained_length",
                "ppl", "ppl_low", "ppl_high", "ppl_past", "ppl_past_low", "ppl_past_high", "past_vs_baseline",
                "past_vs_baseline_low", "past_vs_baseline_high", "n", "interval_note", "ppl_within", "tokens", "tokens_past",
                "seconds"]
    pk_cols = ["model", "fingerprint", "format", "n_keys", "seed", "method", "params", "length", "trained_length",
               "depth", "trials", "successes", "exact", "exact_low", "exact_high", "digit_acc", "digit_acc_low",
               "digit_acc_high", "seconds"]
    stream_cols = ["model", "fingerprint", "config", "label", "method", "params", "sinks", "cache_window", "recompute_every",
                   "document", "positions", "tokens", "trained_length", "ppl", "ppl_last_bucket", "cache_mib_peak", "ms_per_token_median",
                   "measured", "seconds"]
    baselines = {(r["key"]["model"]["fingerprint"], r["key"].get("sample"), r["key"]["length"]): r for r in records
                 if r["key"].get("task") == "ppl" and r["key"]["method"] == SLIDING}
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
                if task == "ppl":
                    row.update(_interval_columns(r, baselines))
                elif task == "passkey":
                    iv, dv = exact_interval([r["result"]]), digit_interval([r["result"]])
                    row.update(successes=successes(r["result"]), exact_low=iv.low, exact_high=iv.high,
                               digit_acc_low=dv.low if dv else None, digit_acc_high=dv.high if dv else None)
                writer.writerow({c: row.get(c) for c in cols})
    with open(out_dir / "ruler.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RULER_COLUMNS)
        writer.writeheader()
        for r in one_per_prompt([r for r in records if r["key"].get("task") == "ruler"]):
            writer.writerows(csv_rows(r))
