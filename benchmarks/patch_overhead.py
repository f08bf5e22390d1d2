"""Overhead of each rope_ext method on SmolLM2-135M (fp32, sdpa): forward and cached decoding.

Forward: ``model(ids, use_cache=False, logits_to_keep=1)`` on ``--length`` tokens (the LM head over
every position is the same for every method, so it is left out of both sides of the ratio).
Decode: prefill ``--context`` tokens once per config into a transformers ``DynamicCache``, then time
``--steps`` single-token steps; the cache is cropped back after each timing, so every round decodes
from the same context.

Repeats are interleaved: each of ``--rounds`` rounds times every config once (in a rotated order);
the median per config is divided by the plain model's median from the same run (the ratio of the
minima is printed beside it: on a shared machine it is the steadier of the two). Figures only,
never asserted. ``--profile LABEL`` prints torch.profiler's top operators for one config instead.
``--methods`` keeps only those methods' rows (and the plain model's), ``--forward-only`` skips the
decode table: the whole-model check of issue 18 is ReRoPE's forward at 16k tokens against the
unpatched model (target <= 1.05x; one forward takes minutes on 2 cores).

    python benchmarks/patch_overhead.py [--length 2048] [--rounds 5] [--threads N] [--quick]
    python benchmarks/patch_overhead.py --length 16384 --methods rerope --forward-only --rounds 3 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

import rope_ext
from rope_ext._compat import cache_kwarg

FACTOR = 4.0
LONG = 16384  # from this forward length on, the ReRoPE-family target is 1.05x


def forward_configs(window: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(label, method, params); method None is the unpatched model."""
    scaled = ["pi", "ntk", "yarn", "llama3", "ntk_by_parts", "dynamic_ntk", "dynamic_yarn"]
    return [("plain", None, {})] + [(m, m, {"factor": FACTOR}) for m in scaled] + [
        (f"rerope(w={window})", "rerope", {"window": window}),
        (f"leaky_rerope(w={window},k=16)", "leaky_rerope", {"window": window, "k": 16.0}),
        (f"self_extend(G=4,w={window})", "self_extend", {"group_size": 4, "window": window}),
        ("none+logn", "none", {"logn": True}),
    ]


def decode_configs(window: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [("plain", None, {}), (f"rerope(w={window})", "rerope", {"window": window}),
            ("dynamic_ntk", "dynamic_ntk", {"factor": FACTOR}), ("yarn", "yarn", {"factor": FACTOR})]


def target(label: str, method: str | None, decode: bool, length: int) -> tuple[str, Callable[[float], bool]] | None:
    """The target printed beside a ratio, and its check (issue 18: ReRoPE-family forward <= 1.05x
    from 16k tokens on, where the window's band is a small part of the attention)."""
    if method is None:
        return None
    if decode:
        return "<= 1.20x", lambda r: r <= 1.20
    if rope_ext.methods.get(method).kind == "frequency":
        return "1.00x +-2%", lambda r: abs(r - 1.0) <= 0.02
    if method in ("rerope", "leaky_rerope", "self_extend"):
        bound = 1.05 if length >= LONG else 2.0
        return f"<= {bound:.2f}x" + ("" if method == "rerope" else " (as ReRoPE)"), lambda r: r <= bound
    return None


def select(configs: list[tuple[str, str | None, dict[str, Any]]], methods: list[str] | None) -> list[tuple[str, str | None, dict[str, Any]]]:
    """The plain model plus the configs of ``methods`` (all when None)."""
    return configs if methods is None else [c for c in configs if c[1] is None or c[1] in methods]


def run_patched(model, method: str | None, params: dict[str, Any], fn: Callable[[], Any]) -> Any:
    if method is None:
        return fn()
    with rope_ext.patched(model, method, **params):
        return fn()


def time_forward(model, ids: torch.Tensor) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start

    return once


def prefill(model, ids: torch.Tensor) -> Callable[[], DynamicCache]:
    cache_name = cache_kwarg(model)

    def once() -> DynamicCache:
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **{cache_name: cache}, use_cache=True, logits_to_keep=1)
        return cache

    return once


def time_decode(model, cache: DynamicCache, tokens: torch.Tensor) -> Callable[[], float]:
    """Seconds per token over ``len(tokens)`` single-token steps; the cache is cropped back after."""

    cache_name = cache_kwarg(model)

    def once() -> float:
        start = time.perf_counter()
        for t in tokens:
            model(input_ids=t.view(1, 1), **{cache_name: cache}, use_cache=True)
        elapsed = time.perf_counter() - start
        cache.crop(-len(tokens))
        return elapsed / len(tokens)

    return once


def interleaved(model, configs, make: Callable[[str], Callable[[], float]], rounds: int, desc: str) -> dict[str, list[float]]:
    """Each round times every config once, starting at a rotated position; returns seconds per config."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    bar = tqdm(total=rounds * len(configs), desc=desc, leave=False)
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for label, method, params in order:
            times[label].append(run_patched(model, method, params, make(label)))
            bar.update()
    bar.close()
    return times


def report(title: str, configs, times: dict[str, list[float]], unit: str, decode: bool, length: int) -> None:
    scale = 1e3
    base = statistics.median(times["plain"])
    print(f"\n{title}")
    base_min = min(times["plain"])
    print(f"{'config':<28} {'median ' + unit:>12} {'min ' + unit:>10} {'ratio':>7} {'(of mins)':>9}  {'target':<20} met")
    for label, method, _ in configs:
        med = statistics.median(times[label])
        ratio = med / base
        goal = target(label, method, decode, length)
        met = "" if goal is None else ("yes" if goal[1](ratio) else "NO")
        print(f"{label:<28} {med * scale:>12.2f} {min(times[label]) * scale:>10.2f} {ratio:>6.3f}x "
              f"{min(times[label]) / base_min:>8.3f}x  {goal[0] if goal else '-':<20} {met}")


def profile(model, configs, label: str, ids: torch.Tensor, tokens: torch.Tensor, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    found = [c for c in configs if c[0] == label]
    if not found:
        raise SystemExit(f"--profile: unknown config {label!r}; known: {', '.join(c[0] for c in configs)}")
    _, method, params = found[0]
    cache = run_patched(model, method, params, prefill(model, ids))
    for what, fn in (("forward", time_forward(model, ids)), ("decode", time_decode(model, cache, tokens))):
        run_patched(model, method, params, fn)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run_patched(model, method, params, fn)
        print(f"\n== {label}: {what} ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=2048, help="forward length in tokens (default 2048)")
    p.add_argument("--context", type=int, help="decode context in tokens (default: --length)")
    p.add_argument("--steps", type=int, default=16, help="single-token steps per decode timing (default 16)")
    p.add_argument("--window", type=int, help="ReRoPE-family window (default min(512, length // 4))")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="length 512, 3 rounds, 8 decode steps")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="time only these methods (and the plain model), e.g. rerope")
    p.add_argument("--forward-only", action="store_true", help="skip the decode table")
    p.add_argument("--profile", metavar="LABEL", help="profile one config (a label of the table) instead of timing")
    p.add_argument("--profile-rows", type=int, default=25)
    args = p.parse_args()
    if args.quick:
        args.length, args.rounds, args.steps = 512, 3, 8
    context = args.context or args.length
    window = args.window or min(512, args.length // 4)
    known = {m for _, m, _ in forward_configs(window) + decode_configs(window) if m is not None}
    if args.methods and set(args.methods) - known:
        p.error(f"--methods: unknown {', '.join(sorted(set(args.methods) - known))}; known: {', '.join(sorted(known))}")
    torch.set_num_threads(args.threads)
    model, _ = rope_ext.load("smollm2", dtype=torch.float32, attn_implementation="sdpa", tokenizer=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=gen)
    ctx_ids = ids if context == args.length else torch.randint(0, model.config.vocab_size, (1, context), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (args.steps,), generator=gen)
    fwd, dec = select(forward_configs(window), args.methods), select(decode_configs(window), args.methods)
    decode = "no decode" if args.forward_only else f"decode {args.steps} steps at context {context}"
    print(f"SmolLM2-135M fp32 sdpa, torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}; "
          f"forward {args.length} tokens, {decode}; {args.rounds} interleaved rounds; factor {FACTOR:g}, window {window}")
    with torch.inference_mode():
        if args.profile:
            profile(model, fwd + dec, args.profile, ctx_ids, tokens, args.profile_rows)
            return
        for _, method, params in tqdm(fwd, desc="warmup", leave=False):
            run_patched(model, method, params, time_forward(model, ids))
        times = interleaved(model, fwd, lambda label: time_forward(model, ids), args.rounds, "forward")
        report(f"forward, {args.length} tokens (ms per forward)", fwd, times, "ms", False, args.length)
        print(f"load average after the forward rounds {os.getloadavg()[0]:.2f}")
        if args.forward_only:
            return
        caches = {label: run_patched(model, m, kw, prefill(model, ctx_ids)) for label, m, kw in tqdm(dec, desc="prefill", leave=False)}
        for label, method, params in dec:
            run_patched(model, method, params, time_decode(model, caches[label], tokens))
        times = interleaved(model, dec, lambda label: time_decode(model, caches[label], tokens), args.rounds, "decode")
        report(f"decode with DynamicCache at context {context} (ms per token)", dec, times, "ms", True, args.length)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
