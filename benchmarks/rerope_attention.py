"""ReRoPE attention cost: the merged path (two SDPA calls + log-sum-exp merge) against the
query-blocked reference, the original two-full-score-matrix form, and plain causal SDPA.

ReRoPE (Su 2023) scores near pairs with one q/k rotation and far pairs with another; its published
code builds two full L x L score matrices. ``rope_ext.kernels.two_part_reference.two_part_attention`` does it per
query block (block 512); ``block = L`` reproduces the two full matrices. The merged path
(``rope_ext.kernels.two_part_merged``) never forms a score matrix: banded near calls by query
block, the far part by chunks of query rows, merged in place by log-sum-exp. Plain SDPA (one causal call,
one set of q/k) is the floor a two-part method can approach. Inputs: batch 1, 32 q / 8 kv heads
on CUDA, 8 q / 2 kv on CPU (two_full's score matrices at 4k would take ~12 GB with 32 heads)
(GQA), d = 128, window 512, causal, no padding. Each configuration runs in a fresh process so its
peak memory is its own, and memory and time are measured in two processes. Peak memory is that
of the second call (after a first call, so one-time kernel initialisation and code pages are left
out; the first call's figure is printed beside it): CPU = peak resident set size above the level
before the call, with glibc's mmap threshold fixed at 128 KiB so freed blocks leave the resident
set; CUDA = torch's peak allocated bytes above those before it (inputs excluded in both).
Seconds: median of ``--repeats`` calls after a warm-up call, in a process with the default
allocator (``--clock cpu``: process CPU time, steadier with 1 thread on a shared machine).

    python benchmarks/rerope_attention.py                                   # CPU, 2k and 4k tokens
    python benchmarks/rerope_attention.py --threads 2 --lengths 8192 16384 --impls sdpa merged
    python benchmarks/rerope_attention.py --device cuda --dtype bfloat16 --lengths 8192 16384
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("sdpa", "merged", "reference", "two_full")
MMAP_THRESHOLD = 128 * 1024  # glibc: blocks above it are mapped and unmapped on free, so RSS follows live memory


def worker(args: argparse.Namespace) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from rope_ext.kernels.two_part_merged import two_part_attention_merged
    from rope_ext.kernels.two_part_reference import two_part_attention

    torch.set_num_threads(args.threads)
    device, dtype, L = torch.device(args.device), getattr(torch, args.dtype), args.length
    g = torch.Generator(device=device).manual_seed(0)
    q_near, q_far = (torch.randn(1, args.heads, L, args.head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    k_near, k_far, value = (torch.randn(1, args.kv_heads, L, args.head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    pos = torch.arange(L, device=device)[None]
    scaling = args.head_dim ** -0.5

    def run() -> torch.Tensor:
        if args.impl == "sdpa":
            return F.scaled_dot_product_attention(q_near, k_near, value, is_causal=True, scale=scaling, enable_gqa=True)
        if args.impl == "merged":
            return two_part_attention_merged(q_near, k_near, q_far, k_far, value, pos, pos, args.window, None, scaling)
        block = L if args.impl == "two_full" else 512
        return two_part_attention(q_near, k_near, q_far, k_far, value, pos, pos, args.window, None, scaling, block_size=block)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        if args.measure == "memory":
            first = measure_peak(run, sync, device)  # includes one-time costs: kernel init, code pages
            return {"peak_mib": measure_peak(run, sync, device) / 2**20, "first_mib": first / 2**20}
        run()
        times = []
        for _ in range(args.repeats):
            began = clock()
            run()
            sync()
            times.append(clock() - began)
    return {"seconds": sorted(times)[len(times) // 2]}


def measure_peak(run, sync, device) -> int:
    """Peak bytes one call adds: CUDA = torch's peak allocated bytes above those before it; CPU =
    peak resident set size (VmHWM, reset through /proc/self/clear_refs) above the level before it."""
    import torch

    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        sync()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - base) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_config(args: argparse.Namespace, impl: str, length: int) -> dict[str, float] | str:
    """Memory and time of one configuration, each from its own fresh process (the memory one with
    glibc's mmap threshold fixed, which would add page faults to the timed calls)."""
    result: dict[str, float] = {}
    for measure in ("memory", "time"):
        command = [sys.executable, __file__, "--worker", "--measure", measure, "--impl", impl, "--length", str(length),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--clock", args.clock, "--window", str(args.window), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                   "--head-dim", str(args.head_dim)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if measure == "memory" else None
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:100]}"
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def main() -> None:
    import psutil
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 2048 4096 on CPU, 8192 16384 on CUDA")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=None, help="default 32 on CUDA, 8 on CPU")
    parser.add_argument("--kv-heads", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (steadier on a shared machine with 1 thread)")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.heads = args.heads or (32 if cuda else 8)
    args.kv_heads = args.kv_heads or (8 if cuda else 2)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    lengths = args.lengths or ([8192, 16384] if cuda else [2048, 4096])
    name = torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} threads, load average {os.getloadavg()[0]:.2f}"
    print(f"ReRoPE attention on {name}, {args.dtype}, torch {torch.__version__}; batch 1, {args.heads} q / {args.kv_heads} kv heads, "
          f"d {args.head_dim}, window {args.window}, causal; median of {args.repeats} after a warm-up call, {args.clock} clock; peak MiB = 2nd call, 1st-call MiB beside it")
    print("impls: sdpa = plain causal SDPA (one q/k set); merged = banded near calls + chunked far calls, LSE-merged in place; reference = query-blocked "
          "(block 512); two_full = reference with block = L (two full score matrices, as ReRoPE's code)")
    print(f"{'L':>6} {'impl':<10} {'seconds':>9} {'peak MiB':>9} {'time / sdpa':>12} {'memory / sdpa':>14} {'memory / two_full':>18} {'1st-call MiB':>13}")
    for length in lengths:
        results = {impl: run_config(args, impl, length) for impl in args.impls}
        sdpa, full = results.get("sdpa"), results.get("two_full")
        for impl, res in results.items():
            if isinstance(res, str):
                print(f"{length:>6} {impl:<10} {res}")
                continue
            print(f"{length:>6} {impl:<10} {res['seconds']:9.3f} {res['peak_mib']:9.1f} {ratio(res, sdpa, 'seconds', 12, 2)} "
                  f"{ratio(res, sdpa, 'peak_mib', 14, 2)} {ratio(res, full, 'peak_mib', 18, 3)} {res['first_mib']:13.1f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def ratio(res: dict[str, float], base: dict[str, float] | str | None, key: str, width: int, digits: int) -> str:
    """res[key] / base[key] right-aligned in ``width`` columns, or '-' when the base failed or is absent."""
    if not isinstance(base, dict) or base[key] <= 0:
        return f"{'-':>{width}}"
    return f"{res[key] / base[key]:{width - 1}.{digits}f}x"


if __name__ == "__main__":
    main()
