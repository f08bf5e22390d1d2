"""``rope-ext eval ppl|passkey``: evaluate methods past a model's trained length into a run directory.

Every finished cell is appended to RUN_DIR/results.jsonl; rerunning the same command resumes and
recomputes nothing. The report (RUN_DIR/report.md, CSV, PNG) is written at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_METHODS = "none,pi,ntk,yarn,rerope,leaky_rerope"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a checkpoint directory (e.g. from `rope-ext pretrain`), a .gguf, or smollm2")
    p.add_argument("--run-dir", required=True, help="directory for results.jsonl, config.json, env.json and the report")
    p.add_argument("--lengths", default="1x,2x,4x,8x,16x", help="comma-separated lengths: tokens (2048, 32k, 1M) or multiples of the trained length (4x); "
                   "see rope_ext.lengths (default: 1x,2x,4x,8x,16x)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated method names; 'none' = the model as loaded (default: {DEFAULT_METHODS})")
    p.add_argument("--method-params", nargs="*", default=[], metavar="METHOD.NAME=VALUE",
                   help="e.g. rerope.window=32 yarn.beta_fast=16; defaults (factor = length / trained length ...) are recorded")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' (held-out split), a directory, a .jsonl or a text file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 when the 1-minute load average is above 1, else every core)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity / passkey retrieval past the trained length",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    ppl = sub.add_parser("ppl", help="perplexity per method and length, with a sliding-window baseline")
    _common(ppl)
    ppl.add_argument("--mode", choices=("truncate", "concat"), default="truncate",
                     help="truncate: documents cut to each length (YaRN); concat: windows of a joined stream (LongLoRA)")
    ppl.add_argument("--docs", type=int, default=1, help="windows (documents) per cell (default: 1)")
    ppl.add_argument("--doc-stride", type=int, default=None, help="concat mode: tokens between window starts (default: the length)")
    ppl.add_argument("--no-sliding", action="store_true", help="leave out the sliding-window baseline")
    ppl.add_argument("--sliding-stride", type=int, default=None, help="stride of the sliding-window baseline (default: trained length // 2)")
    ppl.add_argument("--buckets", type=int, default=16, help="position buckets per window (default: 16)")
    ppl.add_argument("--chunk-size", type=int, default=1024, help="positions per lm_head + loss chunk (default: 1024)")
    ppl.set_defaults(func=run)
    pk = sub.add_parser("passkey", help="passkey retrieval over lengths x depths")
    _common(pk)
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=int, default=10, help="prompts per (length, depth) (default: 10)")
    pk.add_argument("--keys", type=int, default=1, help="keys in the prompt; > 1 = multi-key, one asked (default: 1)")
    pk.add_argument("--format", choices=("compact", "classic"), default="compact",
                    help="compact: '... pass key #NNNNN. ... What is the pass key? #' (lab); classic: the papers' sentences")
    pk.add_argument("--batch-size", type=int, default=16)
    pk.set_defaults(func=run)


def _depths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}") from None


def model_source(name: str) -> str:
    """The model as recorded: an alias as it is, a path made absolute; a missing path is an error."""
    from rope_ext.models import ALIASES

    if name in ALIASES:
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {name!r} not found: give a checkpoint directory, a .gguf file, or one of {', '.join(ALIASES)}")
    return str(path.resolve())


def run(args: argparse.Namespace) -> int:
    import torch

    import rope_ext
    from rope_ext.eval import report
    from rope_ext.eval.results import RunDir
    from rope_ext.eval.runner import set_threads
    from rope_ext.eval.spec import parse_method_params, parse_methods

    methods = parse_methods(args.methods)
    method_params = parse_method_params(args.method_params, methods + ["sliding_window"])
    depths = _depths(args.depths) if args.eval_task == "passkey" else None
    name = model_source(args.model)
    run_dir = RunDir(args.run_dir)
    threads = set_threads(args.threads)
    model, tokenizer = rope_ext.load(name, dtype=getattr(torch, args.dtype))
    record = {"command": ["rope-ext", *sys.argv[1:]], "threads": threads, "dtype": args.dtype}
    if args.eval_task == "ppl":
        from rope_ext.eval.ppl import perplexity

        perplexity(model, tokenizer, args.lengths, methods, method_params=method_params, sliding=not args.no_sliding,
                   sliding_stride=args.sliding_stride, mode=args.mode, n_docs=args.docs, doc_stride=args.doc_stride,
                   seed=args.seed, corpus=args.corpus, buckets=args.buckets, chunk_size=args.chunk_size,
                   model_name=name, run_dir=run_dir, record=record)
    else:
        from rope_ext.eval.passkey import passkey

        passkey(model, tokenizer, args.lengths, methods, depths, trials=args.trials, n_keys=args.keys, fmt=args.format,
                method_params=method_params, seed=args.seed, corpus=args.corpus, batch_size=args.batch_size,
                model_name=name, run_dir=run_dir, record=record)
    if not args.no_report:
        print(f"report: {report.write_report(run_dir.path)}")
    print(f"results: {run_dir.store.path}")
    return 0
