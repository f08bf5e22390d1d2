"""Forward time of InfLLM block memory (``block_memory``, its defaults_for) against the unpatched
model (plain SDPA) on SmolLM2-135M, per dtype: ``model(ids, use_cache=False, logits_to_keep=1)`` on
``--length`` random tokens (the LM head is left out of both sides). Figures only, never asserted.
Target (issue 13): block_memory <= 1.3x plain SDPA at 16k tokens.

    python benchmarks/block_memory.py [--length 16384] [--dtypes float32 bfloat16] [--threads 2] [--rounds 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import rope_ext
from rope_ext import facts

TARGET = 1.3


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.length < 2 or args.threads < 1 or args.rounds < 1:
        raise ValueError(f"--length >= 2, --threads >= 1 and --rounds >= 1, got {args.length}, {args.threads}, {args.rounds}")
    torch.set_num_threads(args.threads)
    print(f"SmolLM2-135M sdpa, torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f}; forward {args.length} tokens, {args.rounds} interleaved round(s)")
    for name in args.dtypes:
        model, _ = rope_ext.load("smollm2", dtype=getattr(torch, name))
        params = rope_ext.methods.get("block_memory").defaults_for(facts.main_spec(facts.model_specs(model)), args.length)
        ids = torch.randint(100, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
        forward_seconds(model, ids[:, :256])  # warm-up: first-call allocations and thread pools
        plain, patched = [], []
        for _ in range(args.rounds):
            plain.append(forward_seconds(model, ids))
            with rope_ext.patched(model, "block_memory", **params):
                patched.append(forward_seconds(model, ids))
        p, b = statistics.median(plain), statistics.median(patched)
        print(f"{name}: block_memory{params}")
        print(f"  plain SDPA {p:8.2f} s   block_memory {b:8.2f} s   ratio {b / p:.3f}x   target <= {TARGET}x "
              f"{'met' if b / p <= TARGET else 'NOT met'}   load average {os.getloadavg()[0]:.2f}")
        print(f"  medians of {args.rounds} round(s); per round (plain s, block_memory s, ratio): "
              + ", ".join(f"({x:.2f}, {y:.2f}, {y / x:.3f}x)" for x, y in zip(plain, patched)))
        del model


if __name__ == "__main__":
    main()
