"""The 95% intervals of stored records (``eval.stats`` applied to a record's per-window values and
per-trial outcomes), shared by the report's tables and its plots."""
from __future__ import annotations

from typing import Any

from .stats import Interval, bootstrap_mean, bootstrap_ppl, bootstrap_ratio, wilson


def documents(result: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A record's per-window values, None when it has none (written by an older version)."""
    docs = result.get("documents")
    return docs if isinstance(docs, list) and docs else None


def ppl_interval(result: dict[str, Any], part: str = "") -> Interval | None:
    """Bootstrap interval of a PPL cell's whole-window (``part`` "") or past-the-trained-length
    ("_past") PPL from its windows; None without per-window values for at least 2 windows."""
    docs = documents(result)
    if docs is None or len(docs) < 2 or not all(d["tokens" + part] for d in docs):
        return None
    return bootstrap_ppl([d["nll_sum" + part] for d in docs], [d["tokens" + part] for d in docs])


def ratio_interval(a: dict[str, Any], b: dict[str, Any], part: str = "_past") -> Interval | None:
    """Paired bootstrap interval of PPL(a) / PPL(b) for two records of the same windows; None when
    they were not run on the same windows or lack per-window values for at least 2 of them."""
    da, db = documents(a["result"]), documents(b["result"])
    if da is None or db is None or len(da) != len(db) or len(da) < 2 or a["key"].get("sample") != b["key"].get("sample"):
        return None
    if not all(d["tokens" + part] for d in da + db):
        return None
    return bootstrap_ratio([d["nll_sum" + part] for d in da], [d["tokens" + part] for d in da],
                           [d["nll_sum" + part] for d in db], [d["tokens" + part] for d in db])


def successes(result: dict[str, Any]) -> int:
    """Exact matches of a passkey record, from its per-trial outcomes when present."""
    outcomes = result.get("outcomes")
    if isinstance(outcomes, list) and len(outcomes) == result["trials"]:
        return sum(bool(o["correct"]) for o in outcomes)
    return round(result["exact"] * result["trials"])


def exact_interval(results: list[dict[str, Any]]) -> Interval:
    """Wilson interval of the exact-match rate over every trial of ``results``."""
    return wilson(sum(successes(r) for r in results), sum(r["trials"] for r in results))


def digit_interval(results: list[dict[str, Any]]) -> Interval | None:
    """Bootstrap over trials of per-digit accuracy (digits right / digits of a key); None without per-trial outcomes."""
    if not all(isinstance(r.get("outcomes"), list) and len(r["outcomes"]) == r["trials"] for r in results):
        return None
    values = [o["digits"] / len(k) for r in results for o, k in zip(r["outcomes"], r["keys"])]
    return bootstrap_mean(values) if len(values) > 1 else None
