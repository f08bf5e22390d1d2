"""Dual Chunk Attention vs plain SDPA: forward time of SmolLM2 (the shipped GGUF) at 16k tokens.

For each dtype, the unpatched model (transformers' SDPA, plain RoPE) and the same model patched with
``dca`` at its own defaults for the length (ChunkLlama's chunk_size = 3 L0 / 4, local_window = L0 / 8)
run one forward pass of the decoder stack (``model.model``: the LM head over 49k words is the same for
both and left out) on random tokens, in inference mode, after a warm-up pass at 1024 tokens. Times:
the best of ``--repeats`` passes, as wall-clock seconds and as the process's CPU seconds (with one
thread the CPU seconds are the work done, which other processes on a shared machine inflate far less
than the wall clock). ``--layers N`` keeps the first N decoder layers: every layer does the same
work, so the ratio is that of the whole model in a fraction of the time.

    python benchmarks/dca.py --threads 1 --layers 6 > benchmarks/results/dca_cpu.txt
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import rope_ext


def load(dtype: torch.dtype, layers: int | None) -> torch.nn.Module:
    model, _ = rope_ext.load("smollm2", dtype=dtype, tokenizer=False)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


def best(call, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of ``repeats`` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(100, 40000, (1, args.length), generator=torch.Generator().manual_seed(0))
    warm = ids[:, :1024]
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.dtypes:
        model = load(getattr(torch, name), args.layers)
        params = rope_ext.methods.get("dca").defaults_for(rope_ext.facts.rope_spec(model), args.length)
        with torch.inference_mode():
            model.model(warm)
            plain = best(lambda: model.model(ids), args.repeats)
            with rope_ext.patched(model, "dca", **params):
                model.model(warm)
                dca = best(lambda: model.model(ids), args.repeats)
        rows.append((name, plain, dca))
        layers = model.config.num_hidden_layers
    print(f"dca vs plain SDPA, SmolLM2-135M (GGUF), {args.length} tokens, batch 1, {layers} of 30 decoder layers, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load_before:.2f} before / "
          f"{os.getloadavg()[0]:.2f} after; dca {params}; best of {args.repeats}")
    print(f"{'dtype':>9} {'sdpa s':>8} {'sdpa cpu s':>10} {'dca s':>8} {'dca cpu s':>10} {'ratio':>6} {'ratio cpu':>9}")
    for name, (pw, pc), (dw, dc) in rows:
        print(f"{name:>9} {pw:8.2f} {pc:10.2f} {dw:8.2f} {dc:10.2f} {dw / pw:6.3f} {dc / pc:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
