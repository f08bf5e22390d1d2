"""Overhead of the perplexity harness over the bare forward passes it runs.

Bare: for every (method, length) cell, ``rope_ext.patched`` + ``model(input_ids)`` on each window (full
logits, nothing else). Harness: ``rope_ext.eval.perplexity`` on the same grid into a fresh run directory
(corpus selection, tokenisation, method validation, chunked loss, summaries, JSONL with fsync, model
fingerprint). Both are timed ``--repeats`` times, interleaved; the minimum of each is compared.

    python benchmarks/harness_overhead.py [--model LAB_DIR] [--threads 1]

Without ``--model`` a lab model of the reference shape (4 layers, hidden 128, T=128) is built with
random weights: the cost does not depend on the weights. Prints the ratio harness / bare.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rope_ext.eval.lab import LabConfig, build_model, load_lab
from rope_ext.eval.ppl import perplexity, select_windows
from rope_ext.eval.spec import resolve, trained_length
from rope_ext.eval.tokens import byte_tokenizer
from rope_ext.lengths import parse_lengths

import rope_ext

METHODS = ["none", "yarn", "rerope"]
LENGTHS = "1x,2x,4x,8x,16x"


def bare(model, windows, lengths, trained) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for L in lengths:
            for method in METHODS:
                params = resolve(method, {}, L, trained)
                with rope_ext.patched(model, method, **params):
                    for w in windows[L][0]:
                        model(input_ids=w[None], use_cache=False)
    return time.perf_counter() - start


def harness(model, tok, docs) -> float:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        perplexity(model, tok, LENGTHS, METHODS, sliding=False, n_docs=docs, run_dir=run_dir, progress=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a lab checkpoint (default: the reference shape, random weights)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model, tok = load_lab(args.model)
    else:
        model, tok = build_model(LabConfig(), 259).eval(), byte_tokenizer()
    trained = trained_length(model.config)
    lengths = parse_lengths(LENGTHS, trained)
    windows = select_windows(tok, lengths, "truncate", args.docs)
    bare(model, windows, lengths[:1], trained)
    times = {"bare": [], "harness": []}
    for _ in range(args.repeats):
        times["bare"].append(bare(model, windows, lengths, trained))
        times["harness"].append(harness(model, tok, args.docs))
    b, h = min(times["bare"]), min(times["harness"])
    print(f"grid: {len(METHODS)} methods x lengths {lengths} x {args.docs} document(s), {args.threads} thread(s)")
    print(f"bare forward passes: {b:.2f} s (min of {args.repeats}: {', '.join(f'{t:.2f}' for t in times['bare'])})")
    print(f"harness:             {h:.2f} s (min of {args.repeats}: {', '.join(f'{t:.2f}' for t in times['harness'])})")
    print(f"overhead ratio harness / bare: {h / b:.3f}")


if __name__ == "__main__":
    main()
