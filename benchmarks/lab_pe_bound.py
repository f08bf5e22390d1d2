"""The RoPE base bound tested by training (Men et al. 2024, "Base of RoPE Bounds Context Length";
Su 2024, https://kexue.fm/archives/10122): does passkey retrieval within the trained length fail
when the base is below the bound for that length, and hold above it?

For each trained length T (default 128 and 256; 512 costs about 2 s a step on one CPU thread) the calculator's bound (``rope_ext.calc.base_lower_bound``
for the lab model's head dimension: the first feasible base, and the stable base above which every base
is feasible) sets the bases: ``factor x first feasible`` for each --factors entry (default 1/16, 1/4, 2, 8:
two below, two above). Each base gets a RoPE lab model pre-trained at T, the same passkey fine-tune
(800 steps: with 500, a model above the bound was still far from retrieving), then passkey retrieval
AT T over depths. With ``--n-keys 1,2 --multi-key-fraction 0.2`` also a RULER-style multi-key variant
(two labelled keys, the one asked for among a distractor; a fifth of the fine-tune windows hold two keys,
which slows learning: at 500 steps the fine-tune loss was 5.0 against 2.2 without them). Same budget in
tokens per step at every T (the batch scales as 128 / T). Accuracy with a Wilson 95% interval, pooled
over seeds; the fine-tune's final loss is shown too (retrieval not yet learned still shows there).

Resumable like ``lab_pe.py`` (checkpoints and results stores under --work-dir).

    python benchmarks/lab_pe_bound.py --jobs 2                # the table (~35 min on 2 idle cores)
    python benchmarks/lab_pe_bound.py --contexts 128 --factors 0.25,4 --steps 50 --pk-steps 50   # a quick look
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab_pe import (Job, budget_text, check_configs, common_arguments, finetune_fields, group, lab_fields, parse_depths,
                    passkey_summary, run_table)
from rope_ext.validate import flag, integer, number


def bound_side(base: float, first_feasible: float | None, stable: float | None) -> str:
    """Where ``base`` sits: "below" the first feasible base, "above" the stable one (every larger base
    is feasible too), or "between" (the bound is not monotonic there: feasible islands)."""
    if first_feasible is None or base < first_feasible:
        return "below"
    if stable is not None and base >= stable:
        return "above"
    return "between"


def bound_records(contexts: Sequence[int], head_dim: int) -> list[dict[str, Any]]:
    """The calculator's bound for each trained length, as records (task "bound"). Each length is
    scanned on its own: the scan's grid ends at the certified base of its longest length, so a joint
    scan would move the grid points -- and the bases, and the cached models -- with the other lengths."""
    from rope_ext.calc import base_lower_bound

    return [{"table": "bound", "task": "bound", "trained": b.length, "head_dim": b.head_dim,
             "first_feasible": b.first_feasible, "stable": b.stable, "certified_above": b.certified_above}
            for b in (base_lower_bound(T, head_dim) for T in contexts)]


def bases_for(bound: dict[str, Any], factors: Sequence[float]) -> list[float]:
    """``factor x first feasible base``, to 3 significant digits (so the table reads cleanly)."""
    if bound["first_feasible"] is None:
        raise ValueError(f"no feasible RoPE base at T={bound['trained']} for head_dim {bound['head_dim']}: nothing to bracket")
    return [float(f"{f * bound['first_feasible']:.3g}") for f in factors]


def bound_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per (T, base) with the side of the bound, the LM loss, the passkey training
    exact match and retrieval at T (accuracy over seeds, Wilson interval; per depth: correct / trials)."""
    bounds = {r["trained"]: r for r in records if r["task"] == "bound"}
    keys = group(records, "passkey", "trained", "base", "n_keys")
    train = group(records, "train", "trained", "base")
    n_keys = sorted({k for _, _, k in keys})
    lines = ["| T | base | vs bound | final LM loss | fine-tune loss | passkey train exact | "
             + " | ".join(f"{k}-key @T [95%] (n) | {k}-key per depth" for k in n_keys) + " |",
             "|---" * (6 + 2 * len(n_keys)) + "|"]
    for T, base in sorted({(T, b) for T, b, _ in keys} | set(train)):
        bound = bounds.get(T)
        side = bound_side(base, bound["first_feasible"], bound["stable"]) if bound else "?"
        rs = train.get((T, base), [])
        cells = [str(T), f"{base:g}", side,
                 *(f"{sum(r[f] for r in rs) / len(rs):.3f}" if rs else "—" for f in ("final_loss", "finetune_loss")),
                 f"{sum(r['passkey_train_exact'] for r in rs) / len(rs):.2f}" if rs else "—"]
        for k in n_keys:
            cell = keys.get((T, base, k))
            if not cell:
                cells += ["—", "—"]
                continue
            s = passkey_summary(cell)
            by_depth = group(cell, "passkey", "depth")
            cells += [f"{s.text()} ({s.seeds}x{s.n})",
                      " ".join(f"{sum(r['correct'] for r in v)}/{sum(r['trials'] for r in v)}" for _, v in sorted(by_depth.items()))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"T={T}: first feasible base {_g(b['first_feasible'])}, stable {_g(b['stable'])}, certified above "
             f"{_g(b['certified_above'])} (head_dim {b['head_dim']})" for T, b in sorted(bounds.items())]
    return "\n".join(lines) + "\n\nBound (rope_ext.calc.base_lower_bound): " + "; ".join(notes) + "\n"


def _g(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def plot_bound(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per number of keys: retrieval accuracy at T vs base (log x), one line per T, the
    first feasible (dashed) and stable (dotted) bound of that T marked in its colour."""
    from matplotlib.figure import Figure

    bounds = {r["trained"]: r for r in records if r["task"] == "bound"}
    keys = group(records, "passkey", "trained", "base", "n_keys")
    n_keys = sorted({k for _, _, k in keys})
    fig = Figure(figsize=(6.5 * len(n_keys), 5))
    axes = fig.subplots(1, len(n_keys), squeeze=False)[0]
    for ax, k in zip(axes, n_keys):
        for i, T in enumerate(sorted({T for T, _, _ in keys})):
            color = f"C{i}"
            pts = sorted((b, passkey_summary(v)) for (T2, b, k2), v in keys.items() if (T2, k2) == (T, k))
            ax.errorbar([b for b, _ in pts], [s.mean for _, s in pts], marker="o", capsize=3, color=color, label=f"trained T={T}",
                        yerr=[[s.mean - s.low for _, s in pts], [s.high - s.mean for _, s in pts]])
            bound = bounds.get(T)
            if bound and bound["first_feasible"]:
                ax.axvline(bound["first_feasible"], color=color, linestyle="--", linewidth=1, label=f"bound T={T} (first feasible)")
            if bound and bound["stable"] and bound["stable"] != bound["first_feasible"]:
                ax.axvline(bound["stable"], color=color, linestyle=":", linewidth=1, label=f"bound T={T} (stable)")
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("RoPE base (log)")
        ax.set_ylabel("passkey exact match at the trained length")
        ax.set_title(f"{k} key{'s' if k > 1 else ''} in the window")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Retrieval vs RoPE base (Men et al. 2024 bound marked); 95% Wilson intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="128,256", help="trained lengths (default 128,256)")
    parser.add_argument("--factors", default="0.0625,0.25,2,8", help="bases as multiples of the first feasible bound")
    parser.add_argument("--n-keys", default="1", help="keys per passkey prompt to evaluate, e.g. 1,2 (default 1)")
    parser.add_argument("--multi-key-fraction", type=flag(number, at_least=0, at_most=1), default=0.0,
                        help="fine-tune windows with two keys (default 0; e.g. 0.2 with --n-keys 1,2)")
    common_arguments(parser, steps=250, batch=32, pk_steps=800, pk_batch=32, trials=10)
    parser.set_defaults(seeds=(0,))
    args = parser.parse_args(argv)
    try:
        args.contexts_list = [integer(x, "--contexts", minimum=8, maximum=1 << 16) for x in _numbers(args.contexts, int, "--contexts")]
        args.factor_list = [number(x, "--factors", above=0) for x in _numbers(args.factors, float, "--factors")]
        args.n_keys_list = [integer(x, "--n-keys", minimum=1, maximum=8) for x in _numbers(args.n_keys, int, "--n-keys")]
        depths = parse_depths(args.depths)
        if args.hidden % args.heads:
            raise ValueError(f"--hidden ({args.hidden}) must split into --heads ({args.heads}) heads")
        args.bounds = bound_records(args.contexts_list, args.hidden // args.heads)
        args.built_jobs = [Job("bound", lab_fields(args, b["trained"], seed, rope_theta=base),
                               finetune_fields(args, b["trained"], seed, multi_key_fraction=args.multi_key_fraction),
                               (b["trained"],), (), 0, depths, args.trials, tuple(args.n_keys_list))
                           for b in args.bounds for base in bases_for(b, args.factor_list) for seed in args.seeds]
        check_configs(args.built_jobs)
    except ValueError as err:
        parser.error(str(err))
    return args


def _numbers(text: str, cast: type, name: str) -> list:
    try:
        return [cast(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated {'integers' if cast is int else 'numbers'}, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    budget = budget_text(args, 128) + (f" (at T the batch scales by 128/T: same tokens per step); fine-tune with "
                                       f"{args.multi_key_fraction:g} of windows holding two keys; bases = {args.factors} x first feasible bound")
    return run_table(["benchmarks/lab_pe_bound.py", *argv], args, "lab_pe_bound", bound_table, plot_bound, budget, args.bounds)


if __name__ == "__main__":
    sys.exit(main())
