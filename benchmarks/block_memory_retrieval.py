"""Retrieval through block memory's lookup on SmolLM2-135M, scaled down (issue 13): the classic
passkey at ``--length`` tokens (default 4,096, inside the trained 8,192) with a local window of
``--window`` (default 1,024) and every depth past it, so a key is found only if the memory lookup
selects its block. Rows vary the lookup (each query alone, or the sum of the last n queries) and the
block representatives (the r keys most aligned with the block's mean key, or r = block_size: the
block's mean key); the first row attends every block (top-k covering all: ReRoPE at the window), the
ceiling of the lookup. Same prompts for every row; found k of n with a Wilson 95% interval. Figures
only, never asserted.

    python benchmarks/block_memory_retrieval.py [--threads 1] [--trials 4] [--length 4096] [--window 1024]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

import rope_ext
from rope_ext.eval import passkey, wilson

DEPTHS = (0.05, 0.3, 0.6)


def rows(window: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, block_memory parameters) per row: blocks of window / 32 tokens, top-8 blocks."""
    block = window // 32
    base = dict(window=window, init_tokens=block, block_size=block, topk=8)
    aligned, mean = dict(representatives=1), dict(representatives=block)
    return [
        ("every block (ReRoPE at the window)", dict(base, **mean, topk=10 ** 6, lookup_queries=1)),
        ("1 aligned key, lookup 1 query", dict(base, **aligned, lookup_queries=1)),
        ("1 aligned key, lookup 64 queries", dict(base, **aligned, lookup_queries=64)),
        ("block mean, lookup 1 query", dict(base, **mean, lookup_queries=1)),
        ("block mean, lookup 64 queries", dict(base, **mean, lookup_queries=64)),
        ("block mean, lookup 512 queries", dict(base, **mean, lookup_queries=512)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--trials", type=int, default=4, help="prompts per depth (3 depths)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.window < 32 or args.length <= args.window * 2 or args.trials < 1 or args.threads < 1:
        raise ValueError(f"--window >= 32, --length > 2 x --window, --trials >= 1 and --threads >= 1; got "
                         f"{args.window}, {args.length}, {args.trials}, {args.threads}")
    torch.set_num_threads(args.threads)
    model, tok = rope_ext.load("smollm2", dtype=torch.bfloat16)
    print(f"SmolLM2-135M bfloat16, torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f}; classic passkey at {args.length} tokens, depths {DEPTHS} x {args.trials} trials")
    for label, params in rows(args.window):
        start = time.perf_counter()
        records = passkey(model, tok, [args.length], ["block_memory"], depths=DEPTHS, trials=args.trials, fmt="classic",
                          method_params={"block_memory": params}, batch_size=1, progress=False)
        outcomes = [o for r in records for o in r["result"]["outcomes"]]
        found = wilson(sum(o["correct"] for o in outcomes), len(outcomes))
        print(f"  {label:36s} found {sum(o['correct'] for o in outcomes):2d} of {found.n}  "
              f"[{found.low:.0%}, {found.high:.0%}]  {time.perf_counter() - start:5.0f} s  {params}", flush=True)


if __name__ == "__main__":
    main()
