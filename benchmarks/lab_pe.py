"""Train-time position encodings on the lab (issue 15): every encoding trained with the same budget,
data and seeds at T = 128, then measured at 1x .. 32x the trained length.

For each encoding (rope, alibi, nope and every name in ``rope_ext.eval.encodings``) and seed: a lab LM
is pre-trained (``cached_pretrain``), its perplexity measured on held-out stdlib windows (concat mode)
at each length next to the sliding-window baseline (window = T, stride T/2), then the same passkey
fine-tune (``cached_finetune_passkey``) and passkey retrieval at each length over depths. RoPE rows are
also measured with the training-free methods leaky_rerope and yarn (``rope_ext.eval`` methods, their
defaults for each length; ``--methods-on rope-based`` adds them to every encoding whose model is a
RoPE model at inference, e.g. xpos, inverse_leaky). Per cell: the mean over seeds, the seed spread (half the range), and a 95%
interval -- for perplexity the union of the seeds' paired bootstrap intervals over windows
(``rope_ext.eval.stats.bootstrap_ratio``; at 1x the PPL itself, ``bootstrap_ppl``), for passkey the
Wilson interval of the trials of all seeds pooled.

Budget (the defaults; the same for every model, printed with the table): pre-training 250 steps x 32
windows of 128 bytes, passkey fine-tune 500 steps x 32 -- from the measured cost of the demo's lab model
(400 + 800 such steps took 223 s + 353 s on one thread): about 6 CPU minutes a model with its
evaluation, so 9 encodings x 2 seeds take about an hour with --jobs 2 on an idle 2-core machine.

Resumable: checkpoints are cached by configuration under --work-dir, and every evaluation appends to a
results store there, so a rerun (or a run after a crash) recomputes nothing done. Trainings run in
--jobs worker processes of one torch thread each; a job's training bars go to --work-dir/logs/.

    python benchmarks/lab_pe.py --jobs 2                      # the table (~60 min on 2 idle cores)
    python benchmarks/lab_pe.py --encodings rope,nope --seeds 0 --steps 50 --pk-steps 50   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rope_ext.validate import COUNT, SEED, WORKERS, flag, integer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUILTIN = ("rope", "alibi", "nope")
ROPE_METHODS = ("leaky_rerope", "yarn")
SLIDING = "sliding_window"


@dataclass(frozen=True)
class Job:
    """One lab model: pre-train, optional perplexity, passkey fine-tune, passkey retrieval."""

    table: str
    lab: dict[str, Any]          # LabConfig fields
    finetune: dict[str, Any]     # PasskeyLabConfig fields
    lengths: tuple[int, ...]     # evaluation lengths in tokens
    methods: tuple[str, ...]     # training-free methods measured besides "none"
    ppl_docs: int                # held-out windows per length; 0 = no perplexity
    depths: tuple[float, ...]
    trials: int
    n_keys: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.lab.get('position', 'rope')} T={self.lab['context']} base={self.lab.get('rope_theta', 10000.0):g} seed={self.lab['seed']}"


def available_encodings() -> list[str]:
    """rope, alibi, nope and every registered train-time encoding (when the encodings package exists)."""
    try:
        from rope_ext.eval import encodings
    except ImportError:
        return list(BUILTIN)
    if getattr(encodings, "__file__", None) is None:  # a folder without __init__.py yet: no registry
        return list(BUILTIN)
    return list(dict.fromkeys([*BUILTIN, *encodings.names()]))


def run_job(job: Job, work: str, log: str | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) and evaluate one model on one torch thread; flat records for the tables. In a
    worker process (``log`` given) progress bars go to ``log``."""
    import torch

    torch.set_num_threads(1)
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(log, "a", buffering=1)  # noqa: SIM115 (the worker's stderr for its lifetime)
    from rope_ext import eval as rx

    cache = Path(work) / "checkpoints"
    lm = rx.cached_pretrain(rx.LabConfig(**job.lab), cache)
    pk = rx.cached_finetune_passkey(lm, rx.PasskeyLabConfig(**job.finetune), cache)
    lm_info, pk_info = (json.loads((p / "lab.json").read_text()) for p in (lm, pk))
    meta = {"table": job.table, "encoding": job.lab.get("position", "rope"), "seed": job.lab["seed"],
            "base": float(job.lab.get("rope_theta", 10000.0)), "trained": job.lab["context"]}
    records = [{**meta, "task": "train", "final_loss": lm_info["final_loss"], "pretrain_seconds": lm_info["train_seconds"],
                "passkey_train_exact": pk_info["train_exact_last20"], "finetune_loss": pk_info["final_loss"],
                "finetune_seconds": pk_info["train_seconds"]}]
    methods = ["none", *job.methods]
    if job.ppl_docs:
        model, tokenizer = rx.load_lab(lm)
        out = rx.perplexity(model, tokenizer, list(job.lengths), methods, sliding=True, mode="concat", n_docs=job.ppl_docs,
                            run_dir=Path(work) / "runs" / lm.name, progress=log is None)
        records += ppl_records(meta, out)
    model, tokenizer = rx.load_lab(pk)
    for n_keys in job.n_keys:
        out = rx.passkey(model, tokenizer, list(job.lengths), methods, job.depths, trials=job.trials, n_keys=n_keys,
                         batch_size=4, run_dir=Path(work) / "runs" / pk.name, progress=log is None)
        records += [{**meta, "task": "passkey", "method": r["key"]["method"], "length": r["key"]["length"], "n_keys": n_keys,
                     "depth": r["key"]["depth"], "correct": sum(o["correct"] for o in r["result"]["outcomes"]),
                     "trials": r["result"]["trials"]} for r in out]
    return records


def ppl_records(meta: dict[str, Any], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, length) with the per-window NLL sums of the method and of the
    sliding-window baseline on the same windows."""
    ref = {r["key"]["length"]: r["result"]["documents"] for r in out if r["key"]["method"] == SLIDING}
    records = []
    for r in out:
        if r["key"]["method"] == SLIDING:
            continue
        docs, base = r["result"]["documents"], ref[r["key"]["length"]]
        records.append({**meta, "task": "ppl", "method": r["key"]["method"], "length": r["key"]["length"],
                        "nll": [d["nll_sum"] for d in docs], "tokens": [d["tokens"] for d in docs],
                        "nll_past": [d["nll_sum_past"] for d in docs], "tokens_past": [d["tokens_past"] for d in docs],
                        "ref_nll_past": [d["nll_sum_past"] for d in base], "ref_tokens_past": [d["tokens_past"] for d in base]})
    return records


def run_jobs(jobs: Sequence[Job], work: Path, workers: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job's records (in job order) and the failures ("job: error"); ``workers`` = 1 runs them
    here, more in that many spawned processes. A tqdm bar counts finished jobs."""
    from tqdm.auto import tqdm

    results: dict[int, list[dict[str, Any]]] = {}
    failures: list[str] = []
    bar = tqdm(total=len(jobs), desc="lab models", unit="model", dynamic_ncols=True)

    def finish(i: int, get: Callable[[], list[dict[str, Any]]]) -> None:
        try:
            results[i] = get()
        except Exception as err:  # one failed model must not lose the others' results
            failures.append(f"{jobs[i].name}: {type(err).__name__}: {err}")
        bar.update(1)
        bar.set_postfix_str(jobs[i].name)

    if workers == 1:
        for i, job in enumerate(jobs):
            finish(i, lambda job=job: run_job(job, str(work)))
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job, str(work), str(work / "logs" / f"{_slug(job.name)}.log")): i
                       for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                finish(futures[future], future.result)
    bar.close()
    return [r for i in sorted(results) for r in results[i]], failures


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


@dataclass(frozen=True)
class Summary:
    """A cell over seeds: mean of the seeds' points, half their range, a 95% interval, its n per seed."""

    mean: float
    spread: float
    low: float
    high: float
    n: int
    seeds: int

    def text(self, digits: int = 2) -> str:
        spread = f" ±{self.spread:.{digits}f}" if self.seeds > 1 else ""
        return f"{self.mean:.{digits}f}{spread} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def ppl_summary(records: Sequence[dict[str, Any]]) -> Summary:
    """Over seeds: past the trained length the PPL ratio to the sliding-window baseline (paired
    bootstrap over windows), at the trained length the PPL; interval = union of the seeds' intervals."""
    from rope_ext.eval.stats import bootstrap_ppl, bootstrap_ratio

    if not records:
        raise ValueError("ppl_summary: no records")
    cells = [bootstrap_ratio(r["nll_past"], r["tokens_past"], r["ref_nll_past"], r["ref_tokens_past"])
             if r["length"] > r["trained"] else bootstrap_ppl(r["nll"], r["tokens"]) for r in records]
    points = [c.point for c in cells]
    return Summary(sum(points) / len(points), (max(points) - min(points)) / 2, min(c.low for c in cells),
                   max(c.high for c in cells), cells[0].n, len(cells))


def passkey_summary(records: Sequence[dict[str, Any]]) -> Summary:
    """Exact-match accuracy over seeds: the mean of the seeds' accuracies, half their range, and the
    Wilson interval of every trial of every seed pooled (n = trials per seed)."""
    from rope_ext.eval.stats import wilson

    if not records:
        raise ValueError("passkey_summary: no records")
    per_seed: dict[int, list[int]] = {}
    for r in records:
        right, total = per_seed.setdefault(r["seed"], [0, 0])
        per_seed[r["seed"]] = [right + r["correct"], total + r["trials"]]
    accuracy = [right / total for right, total in per_seed.values()]
    pooled = wilson(sum(c for c, _ in per_seed.values()), sum(t for _, t in per_seed.values()))
    return Summary(sum(accuracy) / len(accuracy), (max(accuracy) - min(accuracy)) / 2, pooled.low, pooled.high,
                   pooled.n // len(per_seed), len(per_seed))


def group(records: Sequence[dict[str, Any]], task: str, *fields: str) -> dict[tuple, list[dict[str, Any]]]:
    """Records of ``task`` keyed by the values of ``fields``."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["task"] == task:
            out.setdefault(tuple(r[f] for f in fields), []).append(r)
    return out


def row_label(encoding: str, method: str) -> str:
    return encoding if method == "none" else f"{encoding} + {method}"


def encodings_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: PPL (1x) and PPL ratio to the sliding window (past 1x) per row and length, then
    passkey accuracy; rows are encodings (and RoPE + a method), in the order first seen."""
    ppl = group(records, "ppl", "encoding", "method", "length")
    keys = group(records, "passkey", "encoding", "method", "length")
    train = group(records, "train", "encoding")
    rows = list(dict.fromkeys((e, m) for e, m, _ in [*ppl, *keys]))
    trained = {r["trained"] for r in records}
    if len(trained) != 1:
        raise ValueError(f"encodings_table: records must share one trained length, got {sorted(trained)}")
    T = trained.pop()
    lines = []
    lengths = sorted({L for _, _, L in ppl})
    if lengths:
        head = [f"PPL @{T} (1x)" if L == T else f"ratio @{L} ({L // T}x)" for L in lengths]
        lines += ["| model | " + " | ".join(head) + " |", "|---" * (len(lengths) + 1) + "|"]
        for e, m in rows:
            cells = [ppl_summary(ppl[(e, m, L)]).text() if (e, m, L) in ppl else "—" for L in lengths]
            lines.append(f"| {row_label(e, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    lengths = sorted({L for _, _, L in keys})
    if lengths:
        n = {L: next(passkey_summary(v) for k, v in keys.items() if k[2] == L) for L in lengths}
        lines += ["| model | " + " | ".join(f"passkey @{L} ({L // T}x, n={n[L].seeds}x{n[L].n})" for L in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for e, m in rows:
            cells = [passkey_summary(keys[(e, m, L)]).text() if (e, m, L) in keys else "—" for L in lengths]
            lines.append(f"| {row_label(e, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    if train:
        lines += ["| encoding | final LM loss | passkey train exact (last 20 steps) | pretrain s | fine-tune s |", "|---|---|---|---|---|"]
        for (e,), rs in train.items():
            lines.append(f"| {e} | " + " | ".join(_mean_spread([r[f] for r in rs]) for f in
                                                   ("final_loss", "passkey_train_exact", "pretrain_seconds", "finetune_seconds")) + " |")
    return "\n".join(lines) + "\n"


def _mean_spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.4g}" + (f" ±{(max(values) - min(values)) / 2:.2g}" if len(values) > 1 else "")


LINE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000", "#b8860b", "#000080", "#32cd32", "#ff00ff", "#8b0000")  # tab10, then six more distinct


def plot_encodings(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Two panels: PPL ratio to the sliding window vs length (past 1x), passkey accuracy vs length;
    mean over seeds with the 95% interval as error bars, one line per row of the table."""
    from matplotlib.figure import Figure

    ppl = group(records, "ppl", "encoding", "method", "length")
    keys = group(records, "passkey", "encoding", "method", "length")
    T = records[0]["trained"]
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig = Figure(figsize=(13, 5.5))
    axes = fig.subplots(1, 2)
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    for ax, cells, summarize, title, ylabel in (
            (axes[0], {k: v for k, v in ppl.items() if k[2] > T}, ppl_summary, "Perplexity past the trained length",
             "PPL / PPL(sliding window), past the trained length (log)"),
            (axes[1], keys, passkey_summary, "Passkey retrieval", "exact-match accuracy")):
        rows = list(dict.fromkeys((e, m) for e, m, _ in cells))
        for i, (e, m) in enumerate(rows):
            pts = sorted((L, summarize(v)) for (e2, m2, L), v in cells.items() if (e2, m2) == (e, m))
            xs = [L * 2 ** (0.03 * (i - (len(rows) - 1) / 2)) for L, _ in pts]  # side by side, not on top of each other
            ys = [s.mean for _, s in pts]
            err = [[s.mean - s.low for _, s in pts], [s.high - s.mean for _, s in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="os^Dv"[i % 5], color=LINE_COLORS[i % len(LINE_COLORS)], capsize=3,
                        label=row_label(e, m), linestyle="-" if m == "none" else "--")
        ax.set_xscale("log", base=2)
        lengths = sorted({L for _, _, L in cells})
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g} ({v / T:g}x)"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(f"evaluation length (tokens; trained {T})")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_formatter(plain)
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set_ylim(-0.05, 1.05)
    fig.suptitle("Lab position encodings: mean over seeds, 95% intervals")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="encoding (+ method)")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    return path


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def header(argv: Sequence[str], seconds: float, load_before: float, threads: str) -> str:
    """The command, threads and load average lines that head a committed result."""
    import torch

    load_after = os.getloadavg()[0]
    return (f"`python {shlex.join(argv)}`\n\ntorch {torch.__version__}, {threads}, load average {load_before:.2f} before / "
            f"{load_after:.2f} after, {seconds / 60:.1f} min this invocation (a rerun reuses --work-dir)\n\n")


def common_arguments(parser: argparse.ArgumentParser, steps: int, batch: int, pk_steps: int, pk_batch: int, trials: int) -> None:
    """The options both tables share: budget, model size, evaluation, workers, outputs."""
    parser.add_argument("--seeds", type=lambda s: tuple(SEED(x) for x in s.split(",")), default=(0, 1), help="comma-separated seeds")
    parser.add_argument("--steps", type=COUNT, default=steps, help=f"pre-training steps (default {steps})")
    parser.add_argument("--batch", type=COUNT, default=batch, help=f"pre-training batch at T=128 (default {batch})")
    parser.add_argument("--pk-steps", type=COUNT, default=pk_steps, help=f"passkey fine-tune steps (default {pk_steps})")
    parser.add_argument("--pk-batch", type=COUNT, default=pk_batch, help=f"passkey fine-tune batch at T=128 (default {pk_batch})")
    parser.add_argument("--hidden", type=COUNT, default=128, help="lab model width (default 128)")
    parser.add_argument("--layers", type=COUNT, default=4, help="lab model layers (default 4)")
    parser.add_argument("--heads", type=COUNT, default=4, help="attention heads (default 4)")
    parser.add_argument("--intermediate", type=COUNT, default=384, help="MLP width (default 384)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--trials", type=COUNT, default=trials, help=f"passkey prompts per length and depth (default {trials})")
    parser.add_argument("--jobs", type=WORKERS, default=2, help="worker processes, one torch thread each (default 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/rope_ext/bench/lab_pe").expanduser(),
                        help="checkpoints, results stores and logs (resumable)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the .md, .png and .jsonl go")


def parse_depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths must be numbers in [0, 1], got {text!r}")
    return depths


def scaled_batch(batch: int, context: int) -> int:
    """The batch at ``context`` with the tokens per step of ``batch`` at 128 (at least 1)."""
    return max(1, batch * 128 // context)


def lab_fields(args: argparse.Namespace, context: int, seed: int, **extra: Any) -> dict[str, Any]:
    return {"context": context, "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
            "intermediate": args.intermediate, "steps": args.steps, "batch": scaled_batch(args.batch, context),
            "seed": seed, **extra}


def finetune_fields(args: argparse.Namespace, context: int, seed: int, **extra: Any) -> dict[str, Any]:
    return {"steps": args.pk_steps, "batch": scaled_batch(args.pk_batch, context), "seed": seed, **extra}


def check_configs(jobs: Sequence[Job]) -> None:
    """Build every job's configurations once, so a bad value fails before any training."""
    from rope_ext.eval import LabConfig, PasskeyLabConfig

    for job in jobs:
        LabConfig(**job.lab)
        PasskeyLabConfig(**job.finetune)


def build_encoding_jobs(args: argparse.Namespace) -> list[Job]:
    from rope_ext.lengths import parse_lengths

    known = available_encodings()
    chosen = known if args.encodings == "all" else [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in known]
    if unknown or not chosen:
        raise ValueError(f"--encodings: unknown {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(known)}")
    lengths = tuple(parse_lengths(args.lengths, args.context, "--lengths", minimum=2))
    depths = parse_depths(args.depths)
    jobs = [Job("encodings", lab_fields(args, args.context, seed, position=e), finetune_fields(args, args.context, seed),
                lengths, ROPE_METHODS if e in methods_on(args.methods_on, chosen) else (), args.docs, depths, args.trials, (1,))
            for seed in args.seeds for e in chosen]
    check_configs(jobs)
    return jobs


def methods_on(which: str, chosen: Sequence[str]) -> list[str]:
    """The encodings that also get leaky_rerope and yarn: "rope", "rope-based" (rope and every
    encoding whose ``rope_based`` is true: a RoPE model at inference) or "none"."""
    if which == "none":
        return []
    if which == "rope":
        return ["rope"]
    from rope_ext.eval import encodings

    return [e for e in chosen if e == "rope" or (e not in BUILTIN and encodings.get(e).rope_based)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encodings", default="all", help="comma-separated encodings, or all (default: all registered)")
    parser.add_argument("--context", type=flag(integer, minimum=8, maximum=1 << 20), default=128, help="trained length T (default 128)")
    parser.add_argument("--lengths", default="1x,2x,4x,8x,16x,32x", help="evaluation lengths (default 1x..32x)")
    parser.add_argument("--docs", type=COUNT, default=8, help="held-out windows per length, >= 2 (default 8)")
    parser.add_argument("--methods-on", choices=("rope", "rope-based", "none"), default="rope",
                        help="which encodings also get leaky_rerope and yarn (default rope)")
    common_arguments(parser, steps=250, batch=32, pk_steps=500, pk_batch=32, trials=8)
    args = parser.parse_args(argv)
    if args.docs < 2:
        parser.error(f"--docs must be >= 2 (a bootstrap interval over windows), got {args.docs}")
    try:
        args.built_jobs = build_encoding_jobs(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def run_table(argv: Sequence[str], args: argparse.Namespace, stem: str,
              render: Callable[[list[dict[str, Any]]], str], plot: Callable[[list[dict[str, Any]], Path], Path],
              budget: str, extra: Sequence[dict[str, Any]] = ()) -> int:
    """Run the jobs, write ``stem``.md / .png / .jsonl (``extra`` records first) under --out-dir,
    print the table and the time."""
    start, load = time.time(), os.getloadavg()[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records, failures = run_jobs(args.built_jobs, args.work_dir, args.jobs)
    if not records:
        print("no model finished:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    records = [*extra, *records]
    table = render(records)
    seconds = time.time() - start
    text = (header(argv, seconds, load, f"{args.jobs} worker(s) x 1 thread") + budget + "\n\n" + table
            + ("".join(f"\nFAILED: {f}" for f in failures)))
    (args.out_dir / f"{stem}.md").write_text(text + "\n")
    write_jsonl(records, args.out_dir / f"{stem}.jsonl")
    plot(records, args.out_dir / f"{stem}.png")
    print(text)
    print(f"\nwrote {args.out_dir / stem}.{{md,png,jsonl}}; total {seconds / 60:.1f} min")
    return 1 if failures else 0


def budget_text(args: argparse.Namespace, context: int) -> str:
    return (f"Budget (same for every model): pre-train {args.steps} steps x batch {scaled_batch(args.batch, context)} x {context} tokens, "
            f"passkey fine-tune {args.pk_steps} steps x batch {scaled_batch(args.pk_batch, context)}; model {args.layers} layers, "
            f"hidden {args.hidden}, {args.heads} heads; seeds {','.join(map(str, args.seeds))}; passkey depths {args.depths}, "
            f"{args.trials} trials each")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    budget = budget_text(args, args.context) + (f"; perplexity on {args.docs} held-out stdlib windows per length (concat), "
                                                 f"sliding-window baseline window {args.context} stride {args.context // 2}")
    return run_table(["benchmarks/lab_pe.py", *argv], args, "lab_pe_encodings", encodings_table, plot_encodings, budget)


if __name__ == "__main__":
    sys.exit(main())
