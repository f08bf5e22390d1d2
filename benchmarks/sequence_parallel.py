"""Sequence parallelism (DeepSpeed Ulysses) on 2 CPU processes over gloo against one process: the
largest logit and gradient differences per method (tiny Llama, 4 heads, 2 key/value heads, 64 tokens,
batch 2; the worker of tests/test_sequence_parallel.py), and the losses of a 3-step lab fine-tune with
``sequence_parallel: 2`` on 2 processes against 1 process, with the wall time of each.

    python benchmarks/sequence_parallel.py            # about 2 minutes (plus DeepSpeed's one-time op build)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def logits_and_gradients(work: Path) -> dict:
    sys.path.insert(0, str(TESTS))
    from test_sequence_parallel import _free_port

    out = work / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPE_EXT_TEST_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                    str(TESTS / "test_sequence_parallel.py"), str(out)], check=True, capture_output=True, env=env)
    return json.loads(out.read_text())


def fine_tunes(work: Path) -> dict[str, tuple[list[float], float]]:
    from test_longlora_helpers import corpus

    from rope_ext.eval.lab import LabConfig, build_model, save_lab
    from rope_ext.eval.tokens import byte_tokenizer
    from rope_ext.longlora.config import load_recipe

    tokenizer = byte_tokenizer()
    lab = LabConfig(context=32, layers=2, hidden=32, heads=4, intermediate=64, steps=1)
    model = save_lab(build_model(lab, len(tokenizer)), tokenizer, work / "lab", {"config": {}})
    recipe = {**load_recipe(REPO / "recipes" / "lab-128-to-512.yaml"), "model": str(model), "data": [str(corpus(work / "data"))],
              "target_length": 64, "batch_size": 2, "max_steps": 3, "warmup_steps": 1, "evaluate": False, "merge": False,
              "save_every": 3, "cache_dir": str(work / "cache")}
    runs = {}
    for name, extra, processes in (("1 process", {}, 1), ("2 processes, sequence_parallel 2", {"sequence_parallel": 2}, 2)):
        out = work / f"run{processes}"
        (work / f"{processes}.yaml").write_text(yaml.safe_dump({**recipe, **extra, "output_dir": str(out)}))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rope_ext.cli", "-q", "finetune", "--recipe", str(work / f"{processes}.yaml"),
                        "--num-processes", str(processes)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        runs[name] = (losses, time.perf_counter() - start)
    return runs


def main() -> int:
    print(f"sequence parallelism on cpu (gloo), 2 processes x 1 thread, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("2-process Ulysses vs 1 process, tiny Llama (4 heads, 2 kv heads), 64 tokens, batch 2:")
        print(f"  {'case':<20} {'max |logit diff|':>17} {'max grad rel diff':>18}")
        for case, found in logits_and_gradients(work).items():
            print(f"  {case:<20} {found['max_abs_logit_diff']:>17.3g} {found['max_grad_rel_diff']:>18.3g}")
        runs = fine_tunes(work)
        print("lab recipe (recipes/lab-128-to-512.yaml; tiny lab model, target 64, batch 2, 3 steps):")
        for name, (losses, seconds) in runs.items():
            print(f"  {name:<34} losses {', '.join(f'{x:.6f}' for x in losses)}  ({seconds:.1f} s with start-up)")
        (one, _), (two, _) = runs.values()
        print(f"  max loss difference {max(abs(a - b) for a, b in zip(one, two, strict=True)):.2g}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
