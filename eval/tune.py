"""Tune a recommendation by measurement (``rope-ext recommend --tune``): candidate parameter sets of
the rule's methods (``rope_ext.calc.recommend.choose``) are evaluated on a few windows of held-out
text at the target length, and the one with the lowest perplexity past the trained length wins.

Candidates, in the order a budget cuts them: each method's parameters as the rule gives them (its
choice, then the runners-up), then a few variants (windows L0/4 and 3 L0/4, a doubled Leaky ReRoPE
k or Self-Extend group, a doubled YaRN factor). Each candidate is one cell of ``rope_ext.eval.perplexity``
in the run directory's results store: a rerun recomputes nothing, an interruption loses at most the
candidate in progress. Every candidate forwards ``n_docs`` windows of ``target`` tokens once.
The spread of a PPL is a 95% bootstrap interval over the windows; a candidate whose paired ratio to
the best has an interval containing 1 is not ranked against it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from rope_ext.calc.recommend import Choice
from rope_ext.methods import RopeSpec, registry
from rope_ext.validate import MAX_COUNT, integer

from .ppl import perplexity, select_windows
from .results import RunDir
from .spec import trained_length
from .stats import Interval, bootstrap_ppl, bootstrap_ratio

REPORT = "tune.md"


@dataclass(frozen=True)
class Candidate:
    """One parameter set to measure: ``rope_ext.patch(model, method, **params)``; ``origin`` says where it comes from."""

    method: str
    params: dict[str, Any]
    origin: str

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        return f"{self.method}({shown})"


def _variants(method: str, params: dict[str, Any], spec: RopeSpec) -> list[tuple[str, dict[str, Any]]]:
    """(origin, given parameters) of the variants of one method's rule parameters; length-dependent
    parameters left out are filled in by the method's ``defaults_for``."""
    L0 = spec.trained_length
    windows = [(f"window L0/4 = {L0 // 4}", L0 // 4), (f"window 3 L0/4 = {3 * L0 // 4}", 3 * L0 // 4)]
    if method in ("leaky_rerope", "self_extend"):
        dependent = "k" if method == "leaky_rerope" else "group_size"
        rest = {k: v for k, v in params.items() if k not in ("window", dependent)}
        out = [(origin, {**rest, "window": w}) for origin, w in windows if 0 < w < L0 - 1 and w != params["window"]]
        doubled = params[dependent] * 2
        return out + [(f"{dependent} x 2 = {doubled:g}", {**params, dependent: doubled})]
    if method in ("yarn", "ntk_by_parts") and "factor" in params:
        return [(f"factor x 2 = {2 * params['factor']:g}", {**params, "factor": 2 * params["factor"]})]
    return []


def _accepted(method: str, params: dict[str, Any], spec: RopeSpec) -> bool:
    """Whether ``rope_ext.patch`` takes these parameters on a model with ``spec`` (validated, then bound)."""
    try:
        registry.get(method)(**params).bind(spec)
    except (TypeError, ValueError):
        return False
    return True


def candidates(choice: Choice, spec: RopeSpec, target: int) -> list[Candidate]:
    """The rule's parameters of its choice and runners-up, then their variants, without duplicates or
    parameter sets the method refuses on this model."""
    if choice.method == "none":
        raise ValueError(f"nothing to tune: the target ({target} tokens) is within the trained length "
                         f"({spec.trained_length}), where the recommendation is no extension ('none')")
    ranked = [(choice.method, choice.params, "the rule's choice")]
    ranked += [(r.method, r.params, f"runner-up {i}") for i, r in enumerate(choice.runners_up, 1)]
    out = [Candidate(m, dict(p), origin) for m, p, origin in ranked]
    for method, params, origin in ranked:
        for what, given in _variants(method, params, spec):
            filled = registry.get(method).defaults_for(spec, target, **given)
            if _accepted(method, filled, spec):
                out.append(Candidate(method, filled, f"{origin}, {what}"))
    unique: dict[str, Candidate] = {}
    for c in out:
        unique.setdefault(f"{c.method}:{sorted(c.params.items())}", c)
    return list(unique.values())


def plan(cands: Sequence[Candidate], target: int, n_docs: int, budget_tokens: int | None = None,
         max_candidates: int | None = None) -> list[Candidate]:
    """The first candidates the budget covers: each forwards ``n_docs`` windows of ``target`` tokens.
    A budget below one candidate is refused with the amount needed."""
    integer(n_docs, "n_docs (--docs)", minimum=1, maximum=MAX_COUNT)
    each, n = n_docs * target, len(cands)
    if budget_tokens is not None:
        integer(budget_tokens, "budget_tokens (--budget-tokens)", minimum=1, maximum=1 << 40)
        if budget_tokens < each:
            raise ValueError(f"--budget-tokens {budget_tokens} cannot cover one candidate: each forwards {n_docs} window(s) "
                             f"x {target} tokens = {each} tokens; give at least {each} ({n * each} for all {n} candidates)")
        n = min(n, budget_tokens // each)
    if max_candidates is not None:
        n = min(n, integer(max_candidates, "max_candidates (--max-candidates)", minimum=1, maximum=MAX_COUNT))
    return list(cands[:n])


@dataclass(frozen=True)
class Measured:
    """A candidate's PPL past the trained length over its windows, its spread, and its paired ratio to the best."""

    candidate: Candidate
    ppl: float
    n: int
    spread: Interval | None
    vs_best: Interval | None
    computed: bool

    def to_dict(self) -> dict[str, Any]:
        def iv(x: Interval | None) -> list[float] | None:
            return None if x is None else [x.low, x.high]
        return {"method": self.candidate.method, "params": dict(self.candidate.params), "origin": self.candidate.origin,
                "ppl_past": self.ppl, "n": self.n, "interval": iv(self.spread),
                "ratio_to_best": None if self.vs_best is None else self.vs_best.point, "ratio_interval": iv(self.vs_best),
                "computed_now": self.computed}


@dataclass(frozen=True)
class Tuned:
    """The outcome of ``tune``: every measured candidate (in plan order), the best, why, and what the budget left out."""

    target: int
    trained: int
    n_docs: int
    rows: tuple[Measured, ...]
    best: int
    why: str
    left_out: tuple[Candidate, ...]
    sources: tuple[str, ...]

    @property
    def choice(self) -> Candidate:
        return self.rows[self.best].candidate

    def to_dict(self) -> dict[str, Any]:
        return {"target_length": self.target, "trained_length": self.trained, "n_docs": self.n_docs,
                "tokens_per_candidate": self.n_docs * self.target, "candidates": [r.to_dict() for r in self.rows],
                "choice": {"method": self.choice.method, "params": dict(self.choice.params)}, "why": self.why,
                "not_evaluated": [{"method": c.method, "params": c.params, "origin": c.origin} for c in self.left_out],
                "sources": list(self.sources)}


def _past(record: dict[str, Any]) -> tuple[list[float], list[int]]:
    docs = record["result"]["documents"]
    return [d["nll_sum_past"] for d in docs], [d["tokens_past"] for d in docs]


def tune(model: torch.nn.Module, tokenizer: Any, planned: Sequence[Candidate], target: int, *, run_dir: RunDir,
         n_docs: int = 3, seed: int = 0, corpus: str = "stdlib", model_name: str | None = None,
         record: dict[str, Any] | None = None, left_out: Sequence[Candidate] = (), progress: bool = True) -> Tuned:
    """Measure each planned candidate (stored ones are read back, the others computed and stored at
    once) on ``n_docs`` windows of ``target`` tokens of the held-out joined stream, and pick the lowest
    PPL past the trained length."""
    if not planned:
        raise ValueError("no candidates to measure")
    trained = trained_length(model.config)
    if target <= trained:
        raise ValueError(f"target ({target}) must exceed the trained length ({trained}) to measure PPL past it")
    windows, sources = select_windows(tokenizer, [target], "concat", n_docs, seed, None, corpus)[target]
    rows = []
    bar = tqdm(planned, desc="tune", dynamic_ncols=True, disable=not progress)
    for c in bar:
        bar.set_postfix_str(c.label)
        before = len(run_dir.store)
        rec = perplexity(model, windows, [target], [c.method], method_params={c.method: c.params}, sliding=False,
                         mode="truncate", n_docs=n_docs, seed=seed, model_name=model_name, run_dir=run_dir,
                         progress=False, record=record)[0]
        rows.append((c, rec, len(run_dir.store) > before))
    bar.close()
    ppls = [rec["result"]["ppl_past"] for _, rec, _ in rows]
    best = min(range(len(rows)), key=lambda i: ppls[i])
    measured = tuple(_measure(c, rec, rows[best][1], computed) for c, rec, computed in rows)
    return Tuned(target, trained, n_docs, measured, best, _why(measured, best), tuple(left_out), tuple(dict.fromkeys(sources)))


def _measure(c: Candidate, rec: dict[str, Any], best: dict[str, Any], computed: bool) -> Measured:
    sums, tokens = _past(rec)
    n = len(sums)
    spread = bootstrap_ppl(sums, tokens) if n >= 2 else None
    vs_best = bootstrap_ratio(sums, tokens, *_past(best)) if n >= 2 else None
    return Measured(c, rec["result"]["ppl_past"], n, spread, vs_best, computed)


def _why(rows: Sequence[Measured], best: int) -> str:
    b = rows[best]
    text = f"lowest PPL past the trained length: {b.ppl:.4g} over {b.n} window(s) ({b.candidate.origin})"
    if b.n < 2:
        return text + ("; with 1 window there is no spread, so this ranking rests on one sample and is not evidence "
                       "of a difference (use --docs 2 or more)")
    ties = [r.candidate.label for i, r in enumerate(rows) if i != best and r.vs_best.low <= 1.0]
    if ties:
        text += (f"; within the spread of it (paired 95% interval of the PPL ratio contains 1): {', '.join(ties)}. "
                 "A difference within the spread is not a ranking: on this evidence these are as good")
    else:
        text += "; every other candidate's paired 95% interval of the PPL ratio lies above 1"
    rule = rows[0]
    if best != 0 and rule.candidate.origin == "the rule's choice":
        text += f". The rule's choice {rule.candidate.label} measured {rule.ppl:.4g} ({rule.ppl / b.ppl:.3f}x the best)"
    return text


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.5g}"


def render(result: Tuned, title: str) -> str:
    """The tuning report as Markdown (written to the run directory and printed)."""
    head = [f"# {title}", "",
            f"Trained length {result.trained}, target {result.target} tokens; each candidate: {result.n_docs} window(s) of "
            f"{result.target} tokens of held-out text ({result.n_docs * result.target} tokens forwarded). PPL over the "
            f"predictions past the trained length; interval: 95% bootstrap over windows; vs best: paired bootstrap of "
            f"the PPL ratio. A difference within the spread is not a ranking.", "",
            "| # | candidate | origin | PPL past L0 | 95% interval | n | vs best (95%) | computed now |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    body = []
    for i, r in enumerate(result.rows):
        iv = "-" if r.spread is None else f"[{_fmt(r.spread.low)}, {_fmt(r.spread.high)}]"
        ratio = "-" if r.vs_best is None else f"{r.vs_best.point:.4f} [{r.vs_best.low:.4f}, {r.vs_best.high:.4f}]"
        mark = "**" if i == result.best else ""
        body.append(f"| {i + 1} | {mark}{r.candidate.label}{mark} | {r.candidate.origin} | {_fmt(r.ppl)} | {iv} | {r.n} | "
                    f"{ratio} | {'yes' if r.computed else 'no (stored)'} |")
    tail = ["", f"**Choice: `{result.choice.label}`** -- {result.why}.", ""]
    if result.left_out:
        tail.append(f"Not evaluated (outside the budget): {', '.join(c.label for c in result.left_out)}.")
    tail.append(f"Text: {', '.join(result.sources)}.")
    return "\n".join(head + body + tail) + "\n"
