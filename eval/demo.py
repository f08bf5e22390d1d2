"""The demo: ``python -m rope_ext.eval.demo --out runs/demo [--smollm2-past-trained]``.

1. Train (or reuse from ``--cache``) the reference lab LM: Llama architecture, 4 layers, hidden 128,
   byte-level, RoPE base 10^4, trained at 128 tokens for 400 steps on the standard library's train split.
2. Perplexity of none / PI / NTK / YaRN / ReRoPE / Leaky ReRoPE at 1x-16x of the trained length with the
   sliding-window baseline (held-out standard-library files, truncate mode, 4 documents).
3. Fine-tune (or reuse) the lab passkey model from that LM; passkey retrieval at 1x, 2x, 4x.
4. SmolLM2-135M (``rope_ext.load("smollm2")``, trained at 8192) at 512, 1024 and 2048 tokens of held-out
   text, plain and with YaRN x4 (as if extended to 32k), to show what a method costs inside the trained
   range; with ``--smollm2-past-trained`` also at 16384 tokens (minutes per forward pass on a CPU).
5. The report: RUN_DIR/report.md (+ CSV, PNG).
Every step resumes: rerunning recomputes nothing that is stored. Around 15 minutes on 2 CPU cores
with nothing cached.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rope_ext
from rope_ext.validate import COUNT, WORKERS

from .lab import LabConfig, cached_pretrain, load_lab
from .lab_passkey import PasskeyLabConfig, cached_finetune_passkey
from .passkey import passkey
from .ppl import perplexity
from .report import write_report
from .results import RunDir
from .runner import set_threads

LAB_METHODS = ["none", "pi", "ntk", "yarn", "rerope", "leaky_rerope"]
LAB_LENGTHS = ["1x", "2x", "4x", "8x", "16x"]
PASSKEY_LENGTHS = ["1x", "2x", "4x"]
DEFAULT_CACHE = "~/.cache/rope_ext/lab"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rope_ext.eval.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"where lab models are kept (default: {DEFAULT_CACHE})")
    p.add_argument("--seeds", default="0", help="lab LM training seeds, comma-separated (default: 0)")
    p.add_argument("--positions", default="rope", help="lab LMs to train: rope, alibi, nope, comma-separated (default: rope)")
    p.add_argument("--docs", type=COUNT, default=4, help="held-out documents per perplexity cell (default: 4)")
    p.add_argument("--trials", type=COUNT, default=20, help="passkey prompts per (length, depth) (default: 20)")
    p.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2")
    p.add_argument("--smollm2-past-trained", action="store_true", help="also evaluate SmolLM2 at 16384 tokens (2x its trained length)")
    p.add_argument("--threads", type=WORKERS, default=None, help="torch CPU threads (default: 1 if the machine is busy, else every core)")
    return p.parse_args(argv)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = _ints(args.seeds, "seeds")
    positions = [p.strip() for p in args.positions.split(",") if p.strip()]
    configs = [LabConfig(position=pos, seed=s) for pos in positions for s in seeds]
    run = RunDir(args.out)
    threads = set_threads(args.threads)
    start = time.time()
    record = {"command": ["python", "-m", "rope_ext.eval.demo", *(argv if argv is not None else sys.argv[1:])], "threads": threads}
    print(f"demo: {threads} thread(s); lab models in {Path(args.cache).expanduser()}; results in {run.path}")
    lms = {}
    for cfg in configs:
        path = cached_pretrain(cfg, args.cache)
        lms[cfg] = path
        model, tok = load_lab(path)
        methods = LAB_METHODS if cfg.position == "rope" else ["none"]
        perplexity(model, tok, LAB_LENGTHS, methods, n_docs=args.docs, model_name=str(path), run_dir=run, record=record)
    reference = next((p for c, p in lms.items() if c.position == "rope"), None)
    if reference is not None:
        pk_path = cached_finetune_passkey(reference, PasskeyLabConfig(), args.cache)
        model, tok = load_lab(pk_path)
        passkey(model, tok, PASSKEY_LENGTHS, LAB_METHODS, trials=args.trials, model_name=str(pk_path), run_dir=run, record=record)
    if not args.no_smollm2:
        model, tok = rope_ext.load("smollm2")
        lengths = [512, 1024, 2048] + ([16384] if args.smollm2_past_trained else [])
        methods = ["none", "yarn"] + (["rerope"] if args.smollm2_past_trained else [])
        params = {"yarn": {"factor": 4.0}}
        perplexity(model, tok, lengths, methods, method_params=params, sliding=False, n_docs=3, model_name="smollm2",
                   run_dir=run, record=record)
    report = write_report(run.path)
    print(f"demo finished in {time.time() - start:.0f} s; report: {report}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        sys.exit(2)
