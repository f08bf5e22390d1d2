"""Retrieval and perplexity past the trained length on the real model: SmolLM2-135M-Instruct (trained
8,192 tokens) at 1x (8k: the model's own ceiling), 2x (16k) and 4x (32k), every method on the same
prompts, into one resumable run directory (rerunning computes only what is missing).

    python benchmarks/longctx_smollm2.py run                      # the whole plan below
    python benchmarks/longctx_smollm2.py run --only passkey --lengths 2x --methods yarn,leaky_rerope
    python benchmarks/longctx_smollm2.py report                   # RUN_DIR/report.md (+ CSV, PNG)

The plan: the classic passkey (the papers' wording) on depths x trials per length; the RULER-style
tasks (the needle tasks ask several questions per prefill; see rope_ext.eval.ruler); perplexity past 8k at 4x
on --docs documents of at least 32k tokens from the whole standard library (the held-out split
holds only two; SmolLM2 was not trained on our split anyway) with the sliding-window baseline. 1x runs the plain model only, 2x every
method, 4x the --best ones. "hf_yarn" is the anchor row: transformers' own YaRN, set through the
model's rope_parameters (no rope_ext code), evaluated as the model as loaded ("none").

bfloat16 by default: on this CPU (AMX) a 16k forward takes 17 s in bfloat16 and 57 s in float32; the
attention merges of rope_ext's methods compute in float32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import rope_ext
from rope_ext.eval import passkey, perplexity, ruler, write_report
from rope_ext.eval.corpus import load_corpus
from rope_ext.facts import trained_length
from rope_ext.lengths import parse_lengths

RUN_DIR = Path(__file__).parent / "results" / "longctx_smollm2"
ANCHOR = "hf_yarn"
EVERY_METHOD = ("none", ANCHOR, "yarn", "leaky_rerope", "self_extend", "dca", "block_memory")
BEST = ("leaky_rerope", "dca", "block_memory")
DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
TASKS = ("passkey", "ruler", "ppl")
NEEDLE_TASKS = ("niah_multikey", "niah_multivalue")   # several questions per prefill
ONE_QUESTION_TASKS = ("variable_tracking", "common_words")


def hf_yarn_model(factor: float, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, str]:
    """SmolLM2 with transformers' own YaRN: rope_parameters set on the config, the rotary module
    rebuilt by transformers from it (the anchor row; rope_ext only loads the weights)."""
    model, tok = rope_ext.load("smollm2", dtype=dtype)
    config = model.config
    trained = config.max_position_embeddings
    config.rope_parameters = {"rope_type": "yarn", "factor": float(factor), "rope_theta": config.rope_parameters["rope_theta"],
                              "original_max_position_embeddings": trained}
    config.max_position_embeddings = int(trained * factor)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(dtype=torch.float32)
    return model, tok, f"smollm2+transformers-yarn-x{factor:g}"


def plan(lengths: Sequence[int], trained: int, methods: Sequence[str], best: Sequence[str]) -> dict[int, list[str]]:
    """Methods per length: the plain model at 1x, every method at 2x, the best ones beyond."""
    out = {}
    for L in lengths:
        chosen = ["none"] if L <= trained else list(methods) if L <= 2 * trained else [m for m in methods if m in best]
        if chosen:
            out[L] = chosen
    return out


def run(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model, tok = rope_ext.load("smollm2", dtype=dtype)
    trained = model.config.max_position_embeddings
    lengths = parse_lengths(args.lengths, trained, "--lengths", minimum=2)
    grid = plan(lengths, trained, args.methods.split(","), args.best.split(","))
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "dtype": args.dtype}
    start = time.time()
    for task in args.only.split(","):
        if task not in TASKS:
            raise ValueError(f"--only: tasks are {', '.join(TASKS)}, got {task!r}")
        for L, methods in grid.items():
            ours = [m for m in methods if m != ANCHOR]
            if ours:
                evaluate(task, model, tok, "smollm2", L, ours, args, record)
            if ANCHOR in methods:
                anchor, anchor_tok, name = hf_yarn_model(L / trained, dtype)
                evaluate(task, anchor, anchor_tok, name, L, ["none"], args, record)
    print(f"finished in {time.time() - start:.0f} s; report: {write_report(args.run_dir)}")


def evaluate(task: str, model: torch.nn.Module, tok: Any, name: str, length: int, methods: list[str],
             args: argparse.Namespace, record: dict[str, Any]) -> None:
    trained = trained_length(model.config)
    if task == "passkey":
        passkey(model, tok, [length], methods, depths=DEPTHS, trials=args.trials, fmt="classic", batch_size=1,
                model_name=name, run_dir=args.run_dir, record=record)
    elif task == "ppl":
        if length > trained:
            perplexity(model, tok, [length], methods, sliding=name == "smollm2", n_docs=args.docs, model_name=name,
                       corpus=load_corpus("stdlib", split="all"), run_dir=args.run_dir, record=record)
    else:
        for tasks, cases in ((NEEDLE_TASKS, args.cases), (ONE_QUESTION_TASKS, args.single_cases)):
            if tasks == ONE_QUESTION_TASKS and length > trained:
                continue   # SmolLM2-135M scores 0 on them at 2k already: past 1x they would only cost forwards
            ruler(model, tok, [length], methods, tasks, cases=cases, model_name=name, run_dir=args.run_dir, record=record)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("--run-dir", default=str(RUN_DIR))
    p.add_argument("--lengths", default="1x,2x,4x")
    p.add_argument("--methods", default=",".join(EVERY_METHOD), help=f"default: {','.join(EVERY_METHOD)}")
    p.add_argument("--best", default=",".join(BEST), help=f"methods run beyond 2x (default: {','.join(BEST)})")
    p.add_argument("--only", default=",".join(TASKS), help=f"tasks to run (default: {','.join(TASKS)})")
    p.add_argument("--trials", type=int, default=4, help="passkey prompts per depth (5 depths; default 4: 20 cases per length)")
    p.add_argument("--cases", type=int, default=10, help="questions per needle task and length (5 per prompt; default 10)")
    p.add_argument("--single-cases", type=int, default=2, help="prompts per one-question task at 1x (default 2; not run past 1x)")
    p.add_argument("--docs", type=int, default=3, help="documents for perplexity at 4x (default: 3)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if args.action == "report":
        print(write_report(args.run_dir))
        return
    run(args)


if __name__ == "__main__":
    main()
