"""LongNet dilated attention vs full causal SDPA on CPU: forward and forward+backward time and peak
memory from 1k to 32k tokens, and how each grows from 2k to 32k.

Attention only (``rope_ext.methods.dilated.dilated_attention`` on random q, k, v; no model): batch 1,
``--heads`` heads of ``--dim`` dims, float32. ``full`` is ``torch.nn.functional.scaled_dot_product_attention``
with ``is_causal=True``. Two dilated configurations, both LongNet's geometric pairs from 2048 with
every compressed segment 2048 rows: ratio 2 (w = 2048 .. 32768, r = 1 .. 16, the paper's) and ratio 4
(w = 2048, 8192, 32768, r = 1, 4, 16). Their cost sum_i N min(w_i, N) / r_i^2 is linear in N once
N >= every w_i; below that the large segments are cut at the sequence end and cost less, so the
32k/2k ratio is above 16 by the factor printed as "model".

Each (configuration, length) runs in a fresh process with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``: every tensor buffer is its own mapping, returned on free). Peak memory
is the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
measured call) minus the resident size just before it. Times: the best of ``--repeats`` (5) calls
(one above 4096 tokens) after a warm-up call at 1024 tokens, as wall-clock seconds and as the
process's CPU seconds; with one thread the CPU seconds are the work done, which other processes on a
shared machine inflate far less than the wall clock, so the 32k / 2k ratios are given for both.

    python benchmarks/dilated.py --threads 1 > benchmarks/results/dilated_cpu.txt
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "full": None,
    "dilated_r2": ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)),
    "dilated_r4": ((2048, 8192, 32768), (1, 4, 16)),
}
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(call, repeats: int) -> tuple[float, float, float]:
    """(best wall seconds, best CPU seconds, peak MiB above the resident size before the first call)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = memory_kib("VmRSS")
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, (memory_kib("VmHWM") - before) / 1024


def worker(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from rope_ext.methods.dilated import dilated_attention

    torch.set_num_threads(args.threads)
    pairs = CONFIGS[args.config]

    def attend(q, k, v):
        if pairs is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        pos = torch.arange(q.shape[2])[None]
        return dilated_attention(q, k, v, pos, pos, pairs[0], pairs[1], None, q.shape[-1] ** -0.5)

    def tensors(L: int):
        g = torch.Generator().manual_seed(L)
        q, k, v, dout = (torch.randn(1, args.heads, L, args.dim, generator=g) for _ in range(4))
        return [t.requires_grad_() for t in (q, k, v)], dout

    def forward_backward(qkv, dout) -> None:
        out = attend(*qkv)
        out.backward(dout if pairs is None else dout.transpose(1, 2))
        for t in qkv:
            t.grad = None

    forward_backward(*tensors(1024))
    qkv, dout = tensors(args.length)
    repeats = args.repeats if args.length <= 4096 else 1
    with torch.no_grad():
        fwd = measure(lambda: attend(*qkv), repeats)
    both = measure(lambda: forward_backward(qkv, dout), repeats)
    return {"fwd_s": fwd[0], "fwd_cpu": fwd[1], "fwd_mib": fwd[2], "fwd_bwd_s": both[0], "fwd_bwd_cpu": both[1],
            "fwd_bwd_mib": both[2]}


def model_cost(config: str, n: int) -> float:
    """LongNet's attention cost in units of N * 2048: sum_i N min(w_i, N) / r_i^2 (full: N^2)."""
    pairs = CONFIGS[config]
    if pairs is None:
        return n * n / (n * 2048)
    return sum(n * min(w, n) / r ** 2 for w, r in zip(*pairs)) / (n * 2048)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch
    from tqdm import tqdm

    load = os.getloadavg()[0]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results: dict[tuple[str, int], dict[str, float]] = {}
    jobs = [(c, n) for n in args.lengths for c in args.configs]
    for config, n in tqdm(jobs, desc="configurations", file=sys.stderr):
        cmd = [sys.executable, __file__, "--worker", "--config", config, "--length", str(n), "--threads", str(args.threads),
               "--heads", str(args.heads), "--dim", str(args.dim), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{config} at {n} tokens failed:\n{done.stderr[-2000:]}")
        results[config, n] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"dilated vs full causal attention on cpu, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {load:.2f} before / {os.getloadavg()[0]:.2f} after; batch 1, {args.heads} heads, d {args.dim}, float32")
    for config in args.configs:
        pairs = CONFIGS[config]
        print(f"  {config}: " + ("SDPA is_causal=True" if pairs is None else f"segments {pairs[0]}, dilations {pairs[1]}"))
    print(f"{'L':>6} {'config':<11} {'fwd s':>8} {'fwd cpu s':>9} {'fwd MiB':>8} {'f+b s':>8} {'f+b cpu s':>9} {'f+b MiB':>8}")
    for n in args.lengths:
        for config in args.configs:
            r = results[config, n]
            print(f"{n:>6} {config:<11} {r['fwd_s']:>8.3f} {r['fwd_cpu']:>9.3f} {r['fwd_mib']:>8.1f} {r['fwd_bwd_s']:>8.3f} "
                  f"{r['fwd_bwd_cpu']:>9.3f} {r['fwd_bwd_mib']:>8.1f}")
    if 2048 in args.lengths and 32768 in args.lengths:
        print("ratio 32k / 2k (linear: 16; the issue's bound for dilated: 1.3 x 16 = 20.8; model: the cost formula above)")
        for config in args.configs:
            a, b = results[config, 2048], results[config, 32768]
            ratios = "   ".join(f"{key} {b[key] / a[key]:6.1f}" for key in ("fwd_s", "fwd_cpu", "fwd_bwd_s", "fwd_bwd_cpu"))
            print(f"  {config:<11} {ratios}   model {model_cost(config, 32768) / model_cost(config, 2048) * 16:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
