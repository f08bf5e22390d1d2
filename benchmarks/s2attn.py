"""S2-Attn vs full attention: time and peak memory of one training step at a long length.

LongLoRA (Chen et al. 2023, arXiv 2309.12307, Table 11) reports that S2-Attn cuts the attention
cost of a training step by about the number of groups. This measures a lab-sized model (byte-level
Llama, hidden 128, 4 layers, 4 heads) trained at 128 tokens, patched with PI to ``--length`` tokens,
one sequence per step, all parameters trained; full attention is the model's own, S2-Attn goes
through ``rope_ext.patch(..., train_attention=S2Attn())``. Each configuration runs in a fresh
process, so peak memory is its own: on CPU the peak resident set size (ru_maxrss) above the size
just before the first step, on CUDA torch's peak allocated bytes above those before it.

    python benchmarks/s2attn.py                      # CPU, 8192 tokens, eager and sdpa
    python benchmarks/s2attn.py --device cuda --dtype bfloat16 --length 32768
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil


def build_model(attn: str, length: int, s2: bool, dtype: str, device: str):
    import torch
    import transformers

    import rope_ext
    from rope_ext.longlora.s2attn import S2Attn

    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=getattr(torch, dtype))
    rope_ext.patch(model, "pi", target_length=length, train_attention=S2Attn() if s2 else None)
    return model.to(device).train()


def worker(args: argparse.Namespace) -> dict[str, float]:
    """One configuration: a warm-up step, then ``steps`` timed steps."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.attn[0], args.length, args.mode == "s2", args.dtype, args.device)
    ids = torch.randint(3, 259, (1, args.length), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    step()
    sync()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - began) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": seconds, "peak_gib": peak / 2**30}


def run_config(args: argparse.Namespace, attn: str, mode: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", "--attn", attn, "--mode", mode, "--length", str(args.length),
               "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{attn}/{mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["full", "s2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"train step, lab-sized Llama, PI to {args.length} tokens, batch 1, {args.device} {args.dtype}, "
          f"{args.steps} timed step(s) after a warm-up; S2-Attn groups of {args.length // 4}")
    print(f"{'attention':<10} {'full s/step':>12} {'S2 s/step':>10} {'time ratio':>11} {'full GiB':>9} {'S2 GiB':>7} {'memory ratio':>13}")
    for attn in args.attn:
        full, s2 = run_config(args, attn, "full"), run_config(args, attn, "s2")
        print(f"{attn:<10} {full['seconds']:>12.2f} {s2['seconds']:>10.2f} {s2['seconds'] / full['seconds']:>10.2f}x "
              f"{full['peak_gib']:>9.2f} {s2['peak_gib']:>7.2f} {s2['peak_gib'] / full['peak_gib']:>12.2f}x")


if __name__ == "__main__":
    main()
