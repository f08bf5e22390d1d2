"""Streaming with attention sinks (StreamingLLM, Xiao et al. 2023) on a CPU: perplexity, cache memory
and time per token of documents fed one token at a time (``rope_ext.eval.stream``).

(a) The lab model (Llama, 4 layers, hidden 128, byte-level, trained at 128 tokens; the demo's, from
    ``--cache``, trained there first if absent): 8192 held-out tokens (64x the trained length) streamed
    under dense, window (W), sinks (S + W) and sliding (recompute over S + W). S = 4, W = 60: S + W = 64 =
    half the trained length, so every distance a cached query attends over (<= 65) stays inside it.
    The paper's shape: dense and window blow up past the trained length, sinks within ~1.1x of sliding.
(b) Decode time per token with sinks, at 4k and at 64k streamed tokens of one 64k stream (median ms of
    the bucket ending at 4096 vs the last bucket); target ratio <= 1.1 (the cache stops growing).
(c) ``--smollm2``: SmolLM2-135M (trained at 8192), S = 4 + W = 2044, ``--tokens`` (e.g. 32k; hours at
    that length) under sinks and sliding with ``--recompute-every K`` (``--configs`` adds window): PPL,
    per-token time sliding / sinks, peak cache MiB.

Results are kept in ``--run-dir`` (resumable): a rerun prints stored figures without recomputing.

    python benchmarks/streaming.py [--docs 1] [--threads N]        # (a) and (b)
    python benchmarks/streaming.py --smollm2 --tokens 4096 [--recompute-every 128]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch

import rope_ext
from rope_ext.eval.demo import DEFAULT_CACHE
from rope_ext.eval.lab import LabConfig, cached_pretrain, load_lab
from rope_ext.eval.runner import set_threads
from rope_ext.eval.stats import Interval, bootstrap_ppl, bootstrap_ratio
from rope_ext.eval.stream import stream_perplexity


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def by_config(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["key"]["config"], []).append(r)
    return out


def pooled_ppl(recs: list[dict[str, Any]]) -> float:
    """PPL over every measured token of every document."""
    return math.exp(sum(r["result"]["nll"] * r["result"]["tokens"] for r in recs) / sum(r["result"]["tokens"] for r in recs))


def table(records: list[dict[str, Any]]) -> dict[str, float]:
    """Print one row per config; returns its pooled PPL."""
    print(f"{'config':<28} {'docs':>4} {'PPL':>9} {'(doc range)':>17} {'PPL last bucket':>15} {'peak cache MiB':>14} "
          f"{'median ms/tok':>13} {'tokens':>7}")
    ppl = {}
    for name, recs in by_config(records).items():
        ppl[name] = pooled_ppl(recs)
        each = [r["result"]["ppl"] for r in recs]
        spread = f"{min(each):.3f}-{max(each):.3f}" if len(recs) > 1 else "-"
        last = math.exp(statistics.fmean(r["result"]["buckets"][-1]["nll"] for r in recs))
        print(f"{recs[0]['key']['label']:<28} {len(recs):>4} {ppl[name]:>9.3f} {spread:>17} {last:>15.3f} "
              f"{max(r['result']['cache_mib_peak'] for r in recs):>14.3f} "
              f"{statistics.median(r['result']['ms_per_token_median'] for r in recs):>13.2f} "
              f"{sum(r['result']['tokens'] for r in recs):>7}")
    return ppl


def bucket_ms(record: dict[str, Any], end: int) -> float:
    """Median ms per token of the bucket ending at ``end`` (the last bucket when ``end`` is past the stream)."""
    buckets = record["result"]["buckets"]
    return next((b["ms_median"] for b in buckets if b["end"] == end), buckets[-1]["ms_median"])


def lab(args: argparse.Namespace) -> None:
    path = cached_pretrain(LabConfig(), args.cache)
    model, tok = load_lab(path)
    trained = model.config.max_position_embeddings
    run = Path(args.run_dir) / "lab"
    print(f"(a) lab model {path} (trained at {trained}); {args.lab_tokens} tokens ({args.lab_tokens / trained:g}x) x "
          f"{args.docs} document(s) of the held-out stdlib split; sinks S={args.sinks}, window W={args.window} "
          f"(window config: the last W only); sliding: recompute over S+W={args.sinks + args.window}, every token")
    records = stream_perplexity(model, tok, ["dense", "window", "sinks", "sliding"], length=args.lab_tokens, sinks=args.sinks,
                                cache_window=args.window, n_docs=args.docs, bucket=args.bucket, model_name=str(path), run_dir=run)
    ppl = table(records)
    print(f"sinks / sliding PPL: {ppl['sinks'] / ppl['sliding']:.3f}x (target <= ~1.1); dense / sliding "
          f"{ppl['dense'] / ppl['sliding']:.2f}x; window / sliding {ppl['window'] / ppl['sliding']:.2f}x")
    long = stream_perplexity(model, tok, ["sinks"], length=args.long_tokens, sinks=args.sinks, cache_window=args.window,
                             n_docs=1, bucket=args.bucket, model_name=str(path), run_dir=run)[0]
    short_ms, long_ms = bucket_ms(long, args.short_tokens), bucket_ms(long, args.long_tokens)
    print(f"\n(b) sinks decode time per token on one {args.long_tokens}-token stream (median of the {args.bucket}-token bucket): "
          f"{short_ms:.3f} ms at {args.short_tokens} tokens, {long_ms:.3f} ms at {args.long_tokens}; ratio "
          f"{long_ms / short_ms:.3f}x (target <= 1.1); PPL over the {args.long_tokens} tokens {long['result']['ppl']:.3f}, "
          f"peak cache {long['result']['cache_mib_peak']:.3f} MiB")
    dense = by_config(records)["dense"][0]
    print(f"    for contrast, dense ms/token at {args.bucket} vs {args.lab_tokens} tokens: "
          f"{bucket_ms(dense, args.bucket):.3f} vs {bucket_ms(dense, args.lab_tokens):.3f}")


def smollm2(args: argparse.Namespace) -> None:
    model, tok = rope_ext.load("smollm2", dtype=torch.float32)
    trained = model.config.max_position_embeddings
    run = Path(args.run_dir) / "smollm2"
    print(f"(c) SmolLM2-135M fp32 (trained at {trained}); {args.tokens} tokens x {args.docs} document(s); sinks S={args.sinks}, "
          f"W={args.window}; sliding: recompute over S+W={args.sinks + args.window} at every {args.recompute_every}-th prediction")
    records = stream_perplexity(model, tok, args.configs.split(","), length=args.tokens, sinks=args.sinks, cache_window=args.window,
                                n_docs=args.docs, bucket=args.bucket, recompute_every=args.recompute_every,
                                model_name="smollm2", run_dir=run)
    ppl = table(records)
    groups = by_config(records)
    ms = {c: statistics.median(r["result"]["ms_per_token_median"] for r in groups[c]) for c in groups}
    if args.recompute_every == 1:
        window = f", window / sliding {ppl['window'] / ppl['sliding']:.3f}x" if "window" in ppl else ""
        print(f"sinks / sliding PPL {ppl['sinks'] / ppl['sliding']:.3f}x{window}")
    else:
        print(f"no PPL ratio over all tokens: sliding is measured on every {args.recompute_every}-th prediction only "
              f"({groups['sliding'][0]['result']['tokens']} tokens), the others on every token")
        if args.recompute_every == args.bucket and args.docs == 1:
            matched(groups["sinks"][0]["result"]["buckets"], groups["sliding"][0]["result"]["buckets"], args.sinks + args.window)
    print(f"per-token time sliding / sinks {ms['sliding'] / ms['sinks']:.2f}x (median ms/token)")
    flat(groups["sinks"][0]["result"]["buckets"], args.sinks + args.window)


def matched(sinks: list[dict], sliding: list[dict], cache: int) -> None:
    """Sinks vs sliding where the cache is full (bucket start >= S + W), paired by bucket: the sinks
    PPL of each bucket's predictions against sliding's one sampled prediction in it; 95% bootstrap
    intervals over buckets (``rope_ext.eval.stats``, paired for the ratio)."""
    full = [i for i, b in enumerate(sinks) if b["start"] >= cache]
    a_sums, a_tokens = [sinks[i]["nll"] * sinks[i]["tokens"] for i in full], [sinks[i]["tokens"] for i in full]
    b_sums, b_tokens = [sliding[i]["nll"] * sliding[i]["tokens"] for i in full], [sliding[i]["tokens"] for i in full]
    a, b = bootstrap_ppl(a_sums, a_tokens), bootstrap_ppl(b_sums, b_tokens)
    ratio = bootstrap_ratio(a_sums, a_tokens, b_sums, b_tokens)

    def interval(iv: Interval) -> str:
        return f"[{iv.low:.3f}, {iv.high:.3f}]"

    print(f"full cache (predictions from {cache} on), paired by {len(full)} buckets: sinks PPL {a.point:.3f} "
          f"{interval(a)} over {sum(a_tokens)} predictions; sliding PPL {b.point:.3f} {interval(b)} over {sum(b_tokens)} "
          f"sampled predictions; sinks / sliding {ratio.point:.3f}x {interval(ratio)} (95% bootstrap over buckets)")


def flat(buckets: list[dict], cache: int) -> None:
    """Cache memory and decode time once the cache is full: first full bucket, the one ending at 4k, the last."""
    full = [b for b in buckets if b["start"] >= cache]
    at_4k = next((b for b in full if b["end"] >= 4096), full[0])
    mib = sorted({b["cache_bytes_max"] / float(1 << 20) for b in full})
    print(f"sinks cache MiB over every bucket from {cache} to {buckets[-1]['end']}: {', '.join(f'{m:.1f}' for m in mib)} "
          f"(flat); decode ms/token (bucket median) at {at_4k['end']}: {at_4k['ms_median']:.1f}, at {buckets[-1]['end']}: "
          f"{buckets[-1]['ms_median']:.1f} ({buckets[-1]['ms_median'] / at_4k['ms_median']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/bench-streaming", help="results kept here, resumable (default: runs/bench-streaming)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"lab models (default: the demo's, {DEFAULT_CACHE})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 if the machine is busy, else every core)")
    p.add_argument("--docs", type=int, default=1, help="documents per config (default: 1)")
    p.add_argument("--bucket", type=int, default=256)
    p.add_argument("--sinks", type=int, default=None, help="S (default: 4)")
    p.add_argument("--window", type=int, default=None, help="W (default: 60 for the lab model, 2044 for SmolLM2)")
    p.add_argument("--lab-tokens", type=int, default=8192)
    p.add_argument("--short-tokens", type=int, default=4096)
    p.add_argument("--long-tokens", type=int, default=65536)
    p.add_argument("--smollm2", action="store_true", help="run (c) instead of (a) and (b)")
    p.add_argument("--tokens", default="32k", help="(c) tokens streamed (default: 32k)")
    p.add_argument("--recompute-every", type=int, default=128, help="(c) sliding: measure every K-th prediction (default: 128)")
    p.add_argument("--configs", default="sinks,sliding", help="(c) configs, sinks and sliding among them (default: sinks,sliding; "
                   "window adds as long again as sinks)")
    args = p.parse_args()
    args.sinks = 4 if args.sinks is None else args.sinks
    args.window = args.window or (2044 if args.smollm2 else 60)
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} thread(s) of {os.cpu_count()} cores, load average {load_avg()} (1/5/15 min)")
    if args.smollm2:
        smollm2(args)
    else:
        lab(args)
    print(f"load average at the end {load_avg()}")


if __name__ == "__main__":
    main()
