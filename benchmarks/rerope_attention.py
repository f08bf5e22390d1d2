"""ReRoPE attention cost: the merged path (two SDPA calls + log-sum-exp merge) against the
query-blocked reference, the original two-full-score-matrix form, and plain causal SDPA.

ReRoPE (Su 2023) scores near pairs with one q/k rotation and far pairs with another; its published
code builds two full L x L score matrices. ``rope_ext.kernels.two_part_reference.two_part_attention`` does it per
query block (block 512); ``block = L`` reproduces the two full matrices. The merged path
(``rope_ext.kernels.two_part_merged``) never forms a score matrix. Plain SDPA (one causal call,
one set of q/k) is the floor a two-part method can approach. Inputs: batch 1, 32 q / 8 kv heads
on CUDA, 8 q / 2 kv on CPU (two_full's score matrices at 4k would take ~12 GB with 32 heads)
(GQA), d = 128, window 512, causal, no padding. Each configuration runs in a fresh process so its
peak memory is its own: CPU = peak resident set size above the level before the first call,
CUDA = torch's peak allocated bytes above those before it (inputs excluded in both).

    python benchmarks/rerope_attention.py                                   # CPU, 2k and 4k tokens
    python benchmarks/rerope_attention.py --device cuda --dtype bfloat16 --lengths 8192 16384
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLS = ("sdpa", "merged", "reference", "two_full")


def worker(args: argparse.Namespace) -> dict[str, float]:
    import psutil
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

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        if device.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = psutil.Process().memory_info().rss
        run()
        sync()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - began)
    return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak / 2**20}


def run_config(args: argparse.Namespace, impl: str, length: int) -> dict[str, float] | str:
    command = [sys.executable, __file__, "--worker", "--impl", impl, "--length", str(length), "--device", args.device,
               "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats), "--window", str(args.window),
               "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:100]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
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
          f"d {args.head_dim}, window {args.window}, causal; median of {args.repeats} after a warm-up call")
    print("impls: sdpa = plain causal SDPA (one q/k set); merged = two SDPA calls + LSE merge; reference = query-blocked "
          "(block 512); two_full = reference with block = L (two full score matrices, as ReRoPE's code)")
    print(f"{'L':>6} {'impl':<10} {'seconds':>9} {'peak MiB':>9} {'time / sdpa':>12} {'memory / two_full':>18}")
    for length in lengths:
        results = {impl: run_config(args, impl, length) for impl in args.impls}
        sdpa, full = results.get("sdpa"), results.get("two_full")
        for impl, res in results.items():
            if isinstance(res, str):
                print(f"{length:>6} {impl:<10} {res}")
                continue
            t_ratio = f"{res['seconds'] / sdpa['seconds']:11.2f}x" if isinstance(sdpa, dict) else f"{'-':>12}"
            m_ratio = f"{res['peak_mib'] / full['peak_mib']:17.3f}x" if isinstance(full, dict) and full["peak_mib"] > 0 else f"{'-':>18}"
            print(f"{length:>6} {impl:<10} {res['seconds']:9.3f} {res['peak_mib']:9.1f} {t_ratio} {m_ratio}")


if __name__ == "__main__":
    main()
