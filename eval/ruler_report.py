"""The report's RULER part: per task, a table method x length of the mean score over the cases with n
and a 95% interval, and for tasks whose cases have depths a table method x depth at each length.

The interval of a mean score: Wilson's when every case scored 0 or 1 (an exact-match rate), else a
percentile bootstrap over the cases (``rope_ext.eval.stats``); none for one fractional case. A prompt
stored more than once with different numbers of questions asked (a run with more ``cases`` fills up
the last prompt) counts once, by the record that asked most: its questions include the others'.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from .stats import Interval, bootstrap_mean, wilson

CASE_FIELDS = ("case", "depth", "score")
CSV_COLUMNS = ["model", "fingerprint", "seed", "method", "params", "length", "trained_length", "ruler_task", "trial",
               "case", "depth", "score", "expected", "prediction", "seconds"]


def case_problem(result: dict[str, Any]) -> str | None:
    """Why a RULER record's cases cannot be reported, or None."""
    cases = result.get("cases")
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) and all(f in c for f in CASE_FIELDS)
                                                           for c in cases):
        return f"result.cases is not a non-empty list of objects with {', '.join(CASE_FIELDS)}"
    return None


def one_per_prompt(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The RULER records with, per prompt, only the one that asked the most questions."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        prompt = json.dumps({k: v for k, v in r["key"].items() if k != "asked"}, sort_keys=True, default=str)
        if prompt not in best or r["key"]["asked"] > best[prompt]["key"]["asked"]:
            best[prompt] = r
    return list(best.values())


def score_interval(scores: list[float]) -> Interval | None:
    """Mean score with its 95% interval: Wilson for 0/1 scores, a bootstrap over cases otherwise."""
    if all(s in (0, 1) for s in scores):
        return wilson(int(sum(scores)), len(scores))
    return bootstrap_mean(scores) if len(scores) > 1 else None


def _cell(scores: list[float]) -> str:
    if not scores:
        return "–"
    iv = score_interval(scores)
    if iv is None:
        return f"{100 * sum(scores) / len(scores):.0f}%, n={len(scores)} (no interval)"
    return f"{100 * iv.point:.0f}% ({100 * iv.low:.0f}–{100 * iv.high:.0f}), n={iv.n}"


def _cases(records: list[dict[str, Any]]) -> dict[str, dict[tuple[str, int], list[dict[str, Any]]]]:
    """{task: {(method, length): cases}}."""
    out: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["key"]["ruler_task"]][(r["key"]["method"], r["key"]["length"])] += r["result"]["cases"]
    return out


def ruler_section(label: str, records: list[dict[str, Any]], methods: list[str], table) -> list[str]:
    """Markdown for one model's RULER records; ``table(rows, lengths, trained, cell)`` draws a method x length table."""
    trained = records[0]["key"]["trained_length"]
    lengths = sorted({r["key"]["length"] for r in records})
    lines = [f"## RULER-style tasks — {label}", "",
             f"Trained length {trained}. Score: RULER's string match (the fraction of the expected values found in the "
             f"greedy answer), as a mean over the cases (questions); n = cases; in brackets the 95% interval (Wilson when "
             f"every case scored 0 or 1, else a bootstrap over the cases).", ""]
    for task, cells in _cases(records).items():
        lines += [f"**{task}**, mean score:", ""]
        lines += table(methods, lengths, trained, lambda m, L: _cell([c["score"] for c in cells.get((m, L), [])]))
        depths = sorted({c["depth"] for cs in cells.values() for c in cs if c["depth"] is not None})
        for L in lengths if depths else []:
            lines += ["", f"{task} at {L} tokens ({L / trained:g}x), per needle depth:", "",
                      "| method | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
                      "| --- | " + " | ".join("---:" for _ in depths) + " |"]
            for m in methods:
                row = [_cell([c["score"] for c in cells.get((m, L), []) if c["depth"] == d]) for d in depths]
                lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def ruler_summary(label: str, records: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """One line: at the longest length, each task's mean score per method with its interval."""
    L = max(r["key"]["length"] for r in records)
    trained = records[0]["key"]["trained_length"]
    parts = []
    for task, cells in _cases(records).items():
        shown = [f"{m} {_cell([c['score'] for c in cells[(m, L)]])}" for m in methods if cells.get((m, L))]
        if shown:
            parts.append(f"{task}: " + ", ".join(shown))
    return [f"- **{label}**, RULER-style mean score at {L} tokens ({L / trained:g}x): " + "; ".join(parts) + "."]


def csv_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per case of a RULER record."""
    k = record["key"]
    base = {"model": k["model"]["name"], "fingerprint": k["model"]["fingerprint"], "seed": k.get("seed"),
            "method": k["method"], "params": json.dumps(k["params"], sort_keys=True), "length": k["length"],
            "trained_length": k["trained_length"], "ruler_task": k["ruler_task"], "trial": k.get("trial"),
            "seconds": record.get("meta", {}).get("seconds")}
    return [{**base, "case": c["case"], "depth": c["depth"], "score": c["score"], "expected": json.dumps(c.get("expected")),
             "prediction": c.get("prediction")} for c in record["result"]["cases"]]
