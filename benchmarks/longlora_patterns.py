"""LongLoRA's training attention on the lab model: full vs S2-Attn vs LongNet's dilated attention (issue 14).

The cached lab model (byte-level Llama, trained at 128 tokens) is fine-tuned to 512 tokens with the lab
recipe (recipes/lab-128-to-512.yaml: YaRN, LoRA+, same seed, steps and data) three times, changing only
``train_attention``: full, s2 (groups of half the length), dilated (segments 128,256,512, dilations 1,2,4).
Each merged model then attends fully at test time; its perplexity is measured at 512 and 1024 tokens on
held-out windows of the standard-library corpus, on the tokens past the trained 128 (with a 95% bootstrap
interval over windows, ``rope_ext.eval.stats``), next to the base model with training-free YaRN. The
seconds per training step are the median over the run's steps (wall clock: read them with the load average).

Resumable: a finished fine-tune (its ``model/``) is reused, an interrupted or shorter one continued from
its last checkpoint (the recipe's schedule is constant after warm-up, so 400 steps then 600 more equal
1000 at once), and perplexities come from each model's results store, so a rerun recomputes nothing.

    python benchmarks/longlora_patterns.py --threads 1            # ~ 20-40 CPU minutes the first time
    python benchmarks/longlora_patterns.py --steps 20 --docs 4    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rope_ext.longlora.checkpoint import RUN_CONFIG, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "lab-128-to-512.yaml"
PATTERNS = ("full", "s2", "dilated")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the recipe's max_steps)")
    parser.add_argument("--lengths", default="512,1024", help="evaluation lengths (default 512,1024)")
    parser.add_argument("--docs", type=int, default=16, help="held-out windows per length (>= 4; default 16)")
    parser.add_argument("--segments", default="128,256,512", help="dilated pattern's segments (default 128,256,512)")
    parser.add_argument("--dilations", default="1,2,4", help="dilated pattern's dilations (default 1,2,4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--work", default="~/.cache/rope_ext/bench/longlora_patterns", help="runs and results stores")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "longlora_patterns_cpu.txt"))
    args = parser.parse_args(argv)
    if args.docs < 4:
        parser.error(f"--docs must be >= 4 (a 95% interval over windows), got {args.docs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def training_data(work: Path) -> Path:
    """The training split of the standard-library corpus as JSONL (written once)."""
    from rope_ext.eval.corpus import load_corpus

    path = work / "train.jsonl"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": d.text}) + "\n" for d in load_corpus("stdlib", split="train").documents]
        path.with_suffix(".tmp").write_text("".join(lines))
        path.with_suffix(".tmp").replace(path)
    return path


def fine_tune(pattern: str, args: argparse.Namespace, base: Path, data: Path, work: Path) -> Path:
    """The merged model of the lab recipe with ``train_attention`` = pattern (trained, resumed or reused)."""
    from rope_ext.longlora.config import build_config, load_recipe
    from rope_ext.longlora.train import train

    out = work / pattern
    done = complete_checkpoints(out)
    if (out / "model" / "config.json").is_file() and done and done[-1][0] == steps_of(args):
        return out / "model"
    overrides: dict[str, Any] = {"model": str(base), "data": [str(data)], "output_dir": str(out), "train_attention": pattern,
                                 "evaluate": False, "cache_dir": str(work / "tokens"), "max_steps": steps_of(args),
                                 "resume": bool(done)}
    if pattern == "dilated":
        overrides.update(segments=args.segments, dilations=args.dilations)
    config = build_config(load_recipe(RECIPE), overrides)
    train(config)
    return out / "model"


def steps_of(args: argparse.Namespace) -> int:
    """The fine-tune's steps: ``--steps`` or the recipe's max_steps (a run with fewer is continued)."""
    from rope_ext.longlora.config import load_recipe

    return args.steps or load_recipe(RECIPE)["max_steps"]


def seconds_per_step(run: Path) -> float:
    """Median wall seconds of the run's steps (tokens per step / logged tokens per second)."""
    settings = yaml.safe_load((run / RUN_CONFIG).read_text())
    tokens = settings["batch_size"] * settings["grad_accum"] * settings["target_length"]
    rates = [json.loads(line)["tokens_per_s"] for line in (run / "train_log.jsonl").read_text().splitlines() if line]
    return statistics.median(tokens / r for r in rates)


def evaluate(path: Path, name: str, method: str, args: argparse.Namespace, work: Path) -> dict[int, dict[str, Any]]:
    """PPL per length of the model at ``path`` (``method`` "none": as loaded) from its results store."""
    from rope_ext.eval.lab import load_lab
    from rope_ext.eval.ppl import perplexity

    model, tokenizer = load_lab(path)
    lengths = [int(x) for x in args.lengths.split(",")]
    records = perplexity(model, tokenizer, lengths, (method,), sliding=False, mode="concat", n_docs=args.docs,
                         corpus="stdlib", run_dir=work / "eval" / name, model_name=name, progress=False)
    return {r["key"]["length"]: r["result"] for r in records}


def interval(result: dict[str, Any], part: str) -> str:
    """"ppl [low, high]" over the windows, for all tokens (part "") or those past the trained length ("_past")."""
    from rope_ext.eval.stats import bootstrap_ppl

    docs = result["documents"]
    ci = bootstrap_ppl([d[f"nll_sum{part}"] for d in docs], [d[f"tokens{part}"] for d in docs])
    return f"{ci.point:7.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from rope_ext.eval.lab import LabConfig, cached_pretrain

    torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser()
    load_before, began = os.getloadavg()[0], time.time()
    base = cached_pretrain(LabConfig(), "~/.cache/rope_ext/lab")
    data = training_data(work)
    steps = steps_of(args)
    rows = [("base + yarn (no fine-tune)", "-", evaluate(base, "base-yarn", "yarn", args, work))]
    for pattern in PATTERNS:
        model = fine_tune(pattern, args, base, data, work)
        rows.append((f"train {pattern}", f"{seconds_per_step(work / pattern):.3f}",
                     evaluate(model, f"{pattern}-{steps}steps", "none", args, work)))
    lengths = sorted(rows[0][2])
    lines = [
        f"(issue 14; `python benchmarks/longlora_patterns.py {' '.join(sys.argv[1:] if argv is None else argv)}`)",
        f"LongLoRA lab: {RECIPE.relative_to(REPO)} ({steps} steps, batch 8 x 512 tokens, YaRN, LoRA+, seed 42) from the "
        f"lab model trained at 128 tokens; train_attention full / s2 (groups of 256) / dilated (segments {args.segments}, "
        f"dilations {args.dilations}); full attention at test time",
        f"torch {torch.__version__}, {args.threads} thread(s), load average {load_before:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after, {time.time() - began:.0f} s this invocation (a rerun reuses the runs and results stores)",
        f"PPL on the tokens past 128 (and on all tokens), {args.docs} held-out stdlib windows per length (concat), "
        "95% bootstrap intervals over windows; s/step: median wall seconds per training step",
        "",
        f"{'model':28s} {'s/step':>7s} " + " ".join(f"{f'PPL past 128 @ {n}':>28s} {f'PPL all @ {n}':>28s}" for n in lengths),
    ]
    for name, step, results in rows:
        lines.append(f"{name:28s} {step:>7s} " + " ".join(f"{interval(results[n], '_past'):>28s} {interval(results[n], ''):>28s}"
                                                         for n in lengths))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
