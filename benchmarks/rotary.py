"""Rotary embedding speed: rope_ext's fused path against HF eager, torch.compile, Liger, flash-attn.

Rotary is memory-bound; the floor is reading q, k, cos, sin once and writing q, k once, so each
forward is scored as those bytes / time (GB/s) and as a share of the device's peak bandwidth
(fwd+bwd: twice the bytes, the backward reading dq, dk and the tables and writing dq, dk). On the
CPU the peak is measured first: the copy (b = a) and triad (a = b + s c) bandwidth of 512 MiB
tensors (bytes read + written, best of several) for 1..N threads; "% peak" is against the copy
figure at the thread count of the run (rotary, like a copy, reads each byte once and writes once);
shapes whose traffic fits the caches (T=512, decode) can exceed 100%. The clone figure (a copy into
fresh memory) is the practical limit of an out-of-place op, which every path here is: where first
touching new pages is slow (VMs), it is well below the copy figure.
Ratios are against HF's eager ``apply_rotary_pos_emb`` (transformers' Llama) in the same run.
Prefill: B=1, T tokens, 32 q / 8 kv heads, d=128, shared (1, T, d) tables as HF's rotary module
makes them. Decode: T=1 per sequence at position 4095; every path gets the gathered (B, 1, d) rows
as a model hands them over, except ``ours_triton_off`` and flash-attn, which take the 4096-row
table and a per-sequence offset tensor (the gather fused into the kernel). ``ours_rotate`` is
``rope_ext.rotary.rotate`` on q, then on k, as rope_ext's attention calls it (bitwise transformers).
``ours_compiled`` is ``kernel="compiled"`` (inductor, one graph per shape), ``ours_auto`` what
``kernel="auto"`` runs (on the CPU: the compiled graph once a shape recurs). "compile s" is the
compile time a path paid for the row's shape(s) in this process (torch.compile: its first call less
a steady call; ours: rotary_ops_compiled.COMPILE_SECONDS, forward and backward graphs; inductor's
on-disk cache is pointed at a fresh directory unless --warm-cache, so these are cold compiles), and
"break-even" the calls after which that compile has paid for itself (hf_compile against hf_eager,
ours_compiled against ours_torch).
Host overhead: wall time per call of back-to-back decode calls without synchronising, i.e. the
Python + launch cost when the GPU is not the bottleneck. Liger and flash-attn are tried by import.

    python benchmarks/rotary.py --threads 1 --dtype float32      # CPU: all CPU paths vs HF eager
    python benchmarks/rotary.py --threads 1 --quick              # a short check (2 shapes each)
    python benchmarks/rotary.py --device cuda --dtype bfloat16   # all paths, 4k-32k tokens
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

if "--warm-cache" not in sys.argv:  # before torch is imported: inductor reads it when it first compiles
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rope_ext_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rope_ext.kernels import rotary_ops_compiled
from rope_ext.rotary import apply_rotary, cos_sin, rotate

COMPILED = ("hf_compile", "ours_compiled")  # paths whose compile time is reported

PEAK_TBPS = {"H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "GH200": 4.0,
             "A100-SXM4-80GB": 2.04, "A100 80GB PCIe": 1.94, "A100-SXM4-40GB": 1.56, "A100-PCIE-40GB": 1.56, "L40S": 0.864,
             "L4": 0.3, "A10G": 0.6, "RTX 4090": 1.01, "RTX 3090": 0.936}


def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, tbps in PEAK_TBPS.items():
        if key.lower() in name.lower():
            return name, tbps * 1e12
    if "H100" in name:
        return name, 3.35e12
    return name, None


def cpu_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> dict[int, tuple[float, float, float]]:
    """threads -> (copy, triad, clone) bytes/s on the CPU: b.copy_(a), a = b + 3 c (torch.add out=)
    and a.clone() (a copy into freshly allocated memory, whose first touch costs page faults: the
    limit of any out-of-place op) over float32 tensors of ``mib`` MiB, bytes read + written, best of
    ``repeats``; the thread count is restored afterwards."""
    before = torch.get_num_threads()
    n = mib * 2 ** 20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    found = {}
    try:
        for t in range(1, threads + 1):
            torch.set_num_threads(t)
            best = [float("inf")] * 3
            for _ in range(repeats):
                for i, fn in enumerate((lambda: b.copy_(a), lambda: torch.add(b, c, alpha=3.0, out=a), lambda: a.clone())):
                    began = time.perf_counter()
                    fn()
                    best[i] = min(best[i], time.perf_counter() - began)
            found[t] = (2 * n * 4 / best[0], 3 * n * 4 / best[1], 2 * n * 4 / best[2])
    finally:
        torch.set_num_threads(before)
    return found


def timer(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call over ``repeats`` rounds of a few calls, after a warm-up."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        inner = 10
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        return statistics.median(times)
    began, calls = time.perf_counter(), 0
    while time.perf_counter() - began < 0.02:
        fn()
        calls += 1
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - began) / calls)
    return statistics.median(times)


def host_overhead(fn: Callable[[], object], device: torch.device, calls: int = 2000) -> float:
    """Wall seconds per call of ``calls`` back-to-back calls (no sync between them)."""
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls


def implementations(device: torch.device) -> tuple[dict[str, Callable], list[str]]:
    """name -> fn(q, k, cos, sin, inputs) for each available path; plus notes on the missing ones."""
    impls: dict[str, Callable] = {"hf_eager": lambda c: apply_rotary_pos_emb(c["q"], c["k"], c["cos_rows"], c["sin_rows"])}
    notes = []
    try:
        torch._dynamo.config.recompile_limit = 64  # one graph per shape and grad mode; eager past the limit
        compiled = torch.compile(apply_rotary_pos_emb, dynamic=False)
        impls["hf_compile"] = lambda c: compiled(c["q"], c["k"], c["cos_rows"], c["sin_rows"])
    except Exception as err:  # noqa: BLE001 - report any reason compile is unavailable
        notes.append(f"torch.compile unavailable: {err}")
    impls["ours_torch"] = lambda c: apply_rotary(c["q"], c["k"], c["cos_rows"], c["sin_rows"], kernel="torch")
    impls["ours_compiled"] = lambda c: apply_rotary(c["q"], c["k"], c["cos_rows"], c["sin_rows"], kernel="compiled")
    impls["ours_auto"] = lambda c: apply_rotary(c["q"], c["k"], c["cos_rows"], c["sin_rows"], kernel="auto")
    impls["ours_rotate"] = lambda c: (rotate(c["q"], c["cos_rows"], c["sin_rows"]), rotate(c["k"], c["cos_rows"], c["sin_rows"]))
    if device.type == "cuda":
        impls["ours_triton"] = lambda c: apply_rotary(c["q"], c["k"], c["cos_rows"], c["sin_rows"], kernel="triton")
        impls["ours_triton_off"] = lambda c: apply_rotary(c["q"], c["k"], c["cos"], c["sin"], kernel="triton", offsets=c["offsets"])
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        if device.type == "cuda":
            impls["liger"] = lambda c: liger_rotary_pos_emb(c["q"], c["k"], c["cos_rows"], c["sin_rows"])
    except ImportError:
        notes.append("liger-kernel not installed")
    try:
        from flash_attn.layers.rotary import apply_rotary_emb

        if device.type == "cuda":
            impls["flash_attn"] = lambda c: (
                apply_rotary_emb(c["q_bthd"], c["cos_half"], c["sin_half"], seqlen_offsets=c["offsets_fa"]),
                apply_rotary_emb(c["k_bthd"], c["cos_half"], c["sin_half"], seqlen_offsets=c["offsets_fa"]),
            )
    except ImportError:
        notes.append("flash-attn not installed")
    return impls, notes


def make_case(batch: int, seqlen: int, decode: bool, args: argparse.Namespace, device: torch.device, grad: bool) -> dict:
    dtype = getattr(torch, args.dtype)
    d, table_len = args.head_dim, (args.decode_position + 1 if decode else seqlen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    cos, sin = cos_sin(inv_freq, torch.arange(table_len, device=device)[None], 1.0, dtype)
    q = torch.randn(batch, seqlen, args.heads, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seqlen, args.kv_heads, d, device=device, dtype=dtype).transpose(1, 2)
    if grad:
        q.requires_grad_(True)
        k.requires_grad_(True)
    offsets = torch.full((batch,), args.decode_position, device=device, dtype=torch.int32) if decode else None
    rows = slice(args.decode_position, args.decode_position + 1) if decode else slice(None)
    cos_rows, sin_rows = (t[:, rows].expand(batch, -1, -1).contiguous() for t in (cos, sin))
    case = dict(q=q, k=k, cos=cos, sin=sin, offsets=offsets, cos_rows=cos_rows, sin_rows=sin_rows,
                cos_half=cos[0, :, : d // 2].contiguous(), sin_half=sin[0, :, : d // 2].contiguous(),
                offsets_fa=offsets if decode else 0,
                q_bthd=q.detach().transpose(1, 2).requires_grad_(grad), k_bthd=k.detach().transpose(1, 2).requires_grad_(grad))
    elt = torch.finfo(dtype).bits // 8
    case["bytes"] = (2 * (q.numel() + k.numel()) + 2 * batch * seqlen * d) * elt
    return case


def fwd_bwd(fn: Callable, case: dict) -> Callable[[], None]:
    grads = None

    def step() -> None:
        nonlocal grads
        outs = fn(case)
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for key in ("q", "k", "q_bthd", "k_bthd"):
            case[key].grad = None

    return step


def compile_seconds(name: str, fn: Callable, case: dict, grad: bool, device: torch.device) -> float | None:
    """Seconds the path spends compiling this row's shape(s): torch.compile's first call less a
    steady call; ours: the graphs rotary_ops_compiled compiled during the first call. None for
    paths that do not compile."""
    if name not in COMPILED:
        return None
    step = fwd_bwd(fn, case) if grad else (lambda: fn(case))
    known = set(rotary_ops_compiled.COMPILE_SECONDS)
    with torch.set_grad_enabled(grad):
        began = time.perf_counter()
        step()
        first = time.perf_counter() - began
        if name != "hf_compile":
            return sum(v for k, v in rotary_ops_compiled.COMPILE_SECONDS.items() if k not in known)
        began = time.perf_counter()
        step()
    return max(0.0, first - (time.perf_counter() - began))


def report(title: str, shapes: list[tuple[int, int, bool]], args, device, impls, peak: float | None) -> None:
    print(f"\n== {title} ==")
    print(f"{'shape':<18} {'mode':<8} {'path':<14} {'us/call':>10} {'GB/s':>8} {'% peak':>7} {'vs hf_eager':>12} "
          f"{'compile s':>10} {'break-even':>11}")
    for batch, seqlen, decode in shapes:
        label = f"B={batch} T={seqlen}" + (" decode" if decode else "")
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            base = torch_seconds = None
            for name, fn in impls.items():
                if name.endswith("_off") and not decode:
                    continue  # without offsets it is the row above
                case = make_case(batch, seqlen, decode, args, device, grad)
                try:
                    compiling = compile_seconds(name, fn, case, grad, device)
                    if grad:
                        seconds = timer(fwd_bwd(fn, case), device, args.repeats)
                    else:
                        with torch.no_grad():
                            seconds = timer(lambda fn=fn, case=case: fn(case), device, args.repeats)
                except Exception as err:  # noqa: BLE001 - one failing path must not hide the others
                    print(f"{label:<18} {mode:<8} {name:<14} failed: {type(err).__name__}: {str(err)[:80]}")
                    continue
                base = seconds if name == "hf_eager" else base
                torch_seconds = seconds if name == "ours_torch" else torch_seconds
                gbps = case["bytes"] * (2 if grad else 1) / seconds / 1e9
                share = f"{100 * gbps * 1e9 / peak:6.1f}%" if peak else f"{'-':>7}"
                ratio = f"{base / seconds:11.2f}x" if base else f"{'-':>12}"
                comp = f"{compiling:10.2f}" if compiling is not None else f"{'-':>10}"
                even = f"{'-':>11}"
                against = base if name == "hf_compile" else torch_seconds
                if compiling is not None and against is not None:
                    saved = against - seconds
                    even = f"{compiling / saved:11.0f}" if saved > 0 else f"{'never':>11}"
                print(f"{label:<18} {mode:<8} {name:<14} {seconds * 1e6:10.1f} {gbps:8.1f} {share} {ratio} {comp} {even}")


def overheads(args, device, impls) -> None:
    print("\n== host overhead per call (decode B=1 T=1, back-to-back, no sync) ==")
    from rope_ext.kernels import rotary_autograd

    case = make_case(1, 1, True, args, device, grad=False)
    fns = {name: (lambda fn=fn: fn(case)) for name, fn in impls.items() if name != "hf_compile"}
    backend = "triton" if device.type == "cuda" else "torch"
    raw = rotary_autograd.op(backend)
    fns[f"{backend} op, table+offset, no checks"] = lambda: raw(case["q"], case["k"], case["cos"], case["sin"], rotary_dim=args.head_dim,
                                                  offsets=case["offsets"])
    with torch.no_grad():
        for name, fn in fns.items():
            kernel = timer(fn, device, args.repeats) if device.type == "cuda" else None
            extra = f"   (device time {kernel * 1e6:6.1f} us)" if kernel is not None else ""
            print(f"{name:<40} {host_overhead(fn, device, args.calls) * 1e6:8.1f} us/call{extra}")
        stubbed = triton_wrapper_cost(case, args)
        if stubbed is not None:
            print(f"{'ours_triton, launch stubbed':<40} {stubbed * 1e6:8.1f} us/call   (our Python path alone: checks, plan, args)")


def triton_wrapper_cost(case: dict, args) -> float | None:
    """Seconds per apply_rotary(kernel="triton") call with the kernel launch replaced by a no-op:
    what rope_ext adds on top of Triton's own launcher (measurable without a GPU)."""
    from unittest import mock

    try:
        from rope_ext.kernels import rotary_ops_triton
    except ImportError:
        return None

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    env = {} if case["q"].is_cuda else {"TRITON_INTERPRET": "1"}
    with mock.patch.object(rotary_ops_triton, "_rotary_kernel", Stub()), mock.patch.dict(os.environ, env):
        return host_overhead(lambda: apply_rotary(case["q"], case["k"], case["cos"], case["sin"], kernel="triton", offsets=case["offsets"]),
                             torch.device("cpu"), args.calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill T; default 4k-32k on CUDA, 512-8192 on CPU")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--decode-position", type=int, default=4095)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--calls", type=int, default=2000, help="calls for the host-overhead loop")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled paths (hf_compile, ours_compiled, ours_auto)")
    parser.add_argument("--quick", action="store_true", help="a short check: T=512 and 2048 (unless --lengths), decode B=1 and 64, 3 repeats")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual on-disk cache (compile s then shows cache hits)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.quick:
        args.lengths, args.decode_batches, args.repeats = args.lengths or [512, 2048], [1, 64], args.repeats or 3
    args.lengths = args.lengths or ([4096, 8192, 16384, 32768] if cuda else [512, 1024, 2048, 4096, 8192])
    args.repeats = args.repeats or (20 if cuda else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, peak = peak_bandwidth(device)
    load = f", load average {os.getloadavg()[0]:.2f}" if not cuda else ""
    print(f"rotary benchmark on {name}{load}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"q heads {args.heads}, kv heads {args.kv_heads}, d {args.head_dim}; "
          f"peak bandwidth {'%.2f TB/s' % (peak / 1e12) if peak else 'measured below' if not cuda else 'unknown'}")
    if not cuda:
        cores = len(os.sched_getaffinity(0))
        measured = cpu_bandwidth(cores)
        for threads, (copy, triad, clone) in measured.items():
            print(f"CPU bandwidth, {threads:2d} thread(s): copy {copy / 1e9:6.1f} GB/s, triad {triad / 1e9:6.1f} GB/s, "
                  f"clone (fresh output) {clone / 1e9:6.1f} GB/s (512 MiB float32, best of 5)")
        peak = measured[min(torch.get_num_threads(), cores)][0]
        print(f"% peak = GB/s / the copy bandwidth at {torch.get_num_threads()} thread(s), {peak / 1e9:.1f} GB/s")
    print("GB/s counts the ideal traffic (q, k, cos, sin read once; q, k written once); vs hf_eager = its time / this time")
    impls, notes = implementations(device)
    if args.no_compile:
        for skipped in ("hf_compile", "ours_compiled", "ours_auto"):
            impls.pop(skipped, None)
        notes.append("compiled paths skipped (--no-compile)")
    for note in notes:
        print(f"note: {note}")
    report("prefill", [(1, t, False) for t in args.lengths], args, device, impls, peak)
    report("decode", [(b, 1, True) for b in args.decode_batches], args, device, impls, peak)
    overheads(args, device, impls)


if __name__ == "__main__":
    main()
