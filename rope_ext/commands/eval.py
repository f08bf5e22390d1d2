"""``rope-ext eval ppl|passkey|ruler|stream``: evaluate methods past a model's trained length into a run directory.

Every finished cell is appended to RUN_DIR/results.jsonl; rerunning the same command resumes and
recomputes nothing. The report (RUN_DIR/report.md, CSV, PNG) is written at the end. With
``--num-processes N`` (or when started by accelerate launch / torchrun) the cells are shared among
the processes and merged into one results.jsonl (``rope_ext.eval.distributed``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rope_ext.validate import COUNT, NON_NEGATIVE, SEED, WORKERS

DEFAULT_METHODS = "none,pi,ntk,yarn,rerope,leaky_rerope"
logger = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser, corpus: bool = True) -> None:
    _model_options(p, corpus)
    p.add_argument("--lengths", default="1x,2x,4x,8x,16x", help="comma-separated lengths: tokens (2048, 32k, 1M) or multiples of the trained length (4x); "
                   "see rope_ext.lengths (default: 1x,2x,4x,8x,16x)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated method names; 'none' = the model as loaded (default: {DEFAULT_METHODS})")
    _method_params_option(p)


def _method_params_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method-params", nargs="*", default=[], metavar="METHOD.NAME=VALUE",
                   help="e.g. rerope.window=32 yarn.beta_fast=16; defaults (factor = length / trained length ...) are recorded")


def _model_options(p: argparse.ArgumentParser, corpus: bool = True) -> None:
    p.add_argument("--model", required=True, help="a checkpoint directory (e.g. from `rope-ext pretrain`), a .gguf, or smollm2")
    p.add_argument("--run-dir", required=True, help="directory for results.jsonl, config.json, env.json and the report")
    if corpus:
        p.add_argument("--corpus", default="stdlib", help="'stdlib' (held-out split), a directory, a .jsonl or a text file")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=WORKERS, default=None,
                   help="torch CPU threads (default: 1 when the 1-minute load average is above 1, else every core)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--repair", action="store_true", help="drop damaged records of --run-dir's results.jsonl (after naming them) "
                   "and recompute their cells, instead of stopping")
    p.add_argument("--num-processes", type=WORKERS, default=1,
                   help="processes (accelerate launch) that share the cells, merged into one results.jsonl (default: 1)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity / passkey retrieval / streaming past the trained length",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    ppl = sub.add_parser("ppl", help="perplexity per method and length, with a sliding-window baseline")
    _common(ppl)
    ppl.add_argument("--mode", choices=("truncate", "concat"), default="truncate",
                     help="truncate: documents cut to each length (YaRN); concat: windows of a joined stream (LongLoRA)")
    ppl.add_argument("--docs", type=COUNT, default=4, help="windows (documents) per cell; the report's intervals need >= 2 (default: 4)")
    ppl.add_argument("--doc-stride", type=COUNT, default=None, help="concat mode: tokens between window starts (default: the length)")
    ppl.add_argument("--no-sliding", action="store_true", help="leave out the sliding-window baseline")
    ppl.add_argument("--sliding-stride", type=COUNT, default=None, help="stride of the sliding-window baseline (default: trained length // 2)")
    ppl.add_argument("--buckets", type=COUNT, default=16, help="position buckets per window (default: 16)")
    ppl.add_argument("--chunk-size", type=COUNT, default=1024, help="positions per lm_head + loss chunk (default: 1024)")
    ppl.set_defaults(func=run)
    pk = sub.add_parser("passkey", help="passkey retrieval over lengths x depths")
    _common(pk)
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=COUNT, default=10, help="prompts per (length, depth) (default: 10)")
    pk.add_argument("--keys", type=COUNT, default=1, help="keys in the prompt; > 1 = multi-key, one asked (default: 1)")
    pk.add_argument("--format", choices=("compact", "classic"), default="compact",
                    help="compact: '... pass key #NNNNN. ... What is the pass key? #' (lab); classic: the papers' sentences")
    pk.add_argument("--batch-size", type=COUNT, default=16)
    pk.set_defaults(func=run)
    ru = sub.add_parser("ruler", help="RULER-style tasks (multi-key / multi-value needles, variable tracking, common words)")
    _common(ru, corpus=False)
    ru.add_argument("--tasks", default=None, help="comma-separated RULER tasks: niah_multikey, niah_multivalue, variable_tracking, "
                    "common_words (default: all)")
    ru.add_argument("--cases", type=COUNT, default=20, help="questions per (task, length) (default: 20)")
    ru.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                    help="niah_multikey: one needle per depth in [0, 1] in each prompt (default: 0,0.25,0.5,0.75,1)")
    ru.set_defaults(func=run)
    st = sub.add_parser("stream", help="streaming perplexity, one token at a time through the KV cache (attention sinks)")
    _model_options(st)
    st.add_argument("--tokens", required=True, help="tokens streamed per document: 8192, 64k, or a multiple of the trained length (64x)")
    st.add_argument("--configs", default="dense,window,sinks,sliding",
                    help="comma-separated: dense, window (last W), sinks (first S + last W), sliding (recompute over S + W) (default: all)")
    st.add_argument("--sinks", type=NON_NEGATIVE, default=4, help="S: first tokens kept by the sinks config (default: 4)")
    st.add_argument("--cache-window", type=COUNT, default=2044, help="W: last tokens kept by window / sinks (default: 2044)")
    st.add_argument("--method", default="none", help="a method every config runs under, e.g. yarn (default: none = the model as loaded)")
    _method_params_option(st)
    st.add_argument("--docs", type=COUNT, default=1, help="documents (consecutive pieces of the joined corpus) per config (default: 1)")
    st.add_argument("--bucket", type=COUNT, default=256, help="prediction positions per reported bucket (default: 256)")
    st.add_argument("--recompute-every", type=COUNT, default=1,
                    help="sliding: measure only every K-th prediction (positions 0, K, 2K ...), to keep it affordable (default: 1)")
    st.set_defaults(func=run)


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


def _load(args: argparse.Namespace) -> tuple:
    """(model source as recorded, model, tokenizer, record) for a task's arguments."""
    import torch

    from rope_ext.eval.lab import load_model
    from rope_ext.eval.runner import set_threads

    name = model_source(args.model)
    threads = set_threads(args.threads)
    logger.info("loading %s (%s, %d thread%s)", name, args.dtype, threads, "" if threads == 1 else "s")
    model, tokenizer = load_model(name, dtype=getattr(torch, args.dtype))
    record = {"command": ["rope-ext", *sys.argv[1:]], "threads": threads, "dtype": args.dtype}
    return name, model, tokenizer, record


def _finish(args: argparse.Namespace, run_dir: Path) -> int:
    from rope_ext.eval import report

    if not args.no_report:
        print(f"report: {report.write_report(run_dir)}")
    print(f"results: {run_dir / 'results.jsonl'}")
    return 0


def run_stream(args: argparse.Namespace, run_dir) -> None:
    import rope_ext
    from rope_ext.eval.spec import parse_method_params
    from rope_ext.eval.stream import stream_perplexity

    method = rope_ext.methods.get(args.method).name
    params = parse_method_params(args.method_params, [method]).get(method, {})
    name, model, tokenizer, record = _load(args)
    stream_perplexity(model, tokenizer, args.configs, length=args.tokens, sinks=args.sinks, cache_window=args.cache_window,
                      method=method, method_params=params, n_docs=args.docs, bucket=args.bucket,
                      recompute_every=args.recompute_every, seed=args.seed, corpus=args.corpus, model_name=name,
                      run_dir=run_dir, record=record)


def run_task(args: argparse.Namespace, run_dir, methods: list[str], method_params: dict, depths: list[float] | None) -> None:
    name, model, tokenizer, record = _load(args)
    if args.eval_task == "ppl":
        from rope_ext.eval.ppl import perplexity

        perplexity(model, tokenizer, args.lengths, methods, method_params=method_params, sliding=not args.no_sliding,
                   sliding_stride=args.sliding_stride, mode=args.mode, n_docs=args.docs, doc_stride=args.doc_stride,
                   seed=args.seed, corpus=args.corpus, buckets=args.buckets, chunk_size=args.chunk_size,
                   model_name=name, run_dir=run_dir, record=record)
    elif args.eval_task == "ruler":
        from rope_ext.eval.ruler import TASKS, ruler

        ruler(model, tokenizer, args.lengths, methods, TASKS if args.tasks is None else args.tasks, cases=args.cases, depths=depths, seed=args.seed,
              method_params=method_params, model_name=name, run_dir=run_dir, record=record)
    else:
        from rope_ext.eval.passkey import passkey

        passkey(model, tokenizer, args.lengths, methods, depths, trials=args.trials, n_keys=args.keys, fmt=args.format,
                method_params=method_params, seed=args.seed, corpus=args.corpus, batch_size=args.batch_size,
                model_name=name, run_dir=run_dir, record=record)


def _command_line(args: argparse.Namespace) -> list[str]:
    """This process's command line (``sys.argv``) when it is the command ``args`` came from, to relaunch."""
    from rope_ext.cli import build_parser

    argv = sys.argv[1:]
    try:
        again = vars(build_parser().parse_args(argv))
    except SystemExit:
        again = None
    if again != vars(args):
        raise ValueError("--num-processes relaunches the command line, and this process's command line is not this command; "
                         "run `rope-ext eval ... --num-processes N`, or start the processes with accelerate launch / torchrun")
    return argv


def run(args: argparse.Namespace) -> int:
    """Check every input, create the run directory, compute; a run directory this command created
    is removed again if it fails before storing any result. With ``--num-processes`` N > 1 the
    command is relaunched as N processes (accelerate), which share the cells."""
    from rope_ext.eval import distributed
    from rope_ext.eval.spec import parse_method_params, parse_methods

    if args.eval_task == "stream":
        from rope_ext.eval.stream import check_settings, parse_configs

        parse_configs(args.configs)
        check_settings(args.sinks, args.cache_window, args.docs, args.bucket, args.recompute_every)
    else:
        methods = parse_methods(args.methods)
        method_params = parse_method_params(args.method_params, methods + ["sliding_window"])
        depths = _depths(args.depths) if args.eval_task in ("passkey", "ruler") else None
        if args.eval_task == "ruler":
            from rope_ext.eval.ruler import TASKS, check_settings

            check_settings(TASKS if args.tasks is None else args.tasks, args.cases, depths)
    model_source(args.model)
    if args.num_processes > 1 and distributed.launched_world() == 1:
        return distributed.launch(_command_line(args), args.num_processes)
    with distributed.sharing():
        run_dir = distributed.run_dir(args.run_dir, repair=args.repair)
        try:
            if args.eval_task == "stream":
                run_stream(args, run_dir)
            else:
                run_task(args, run_dir, methods, method_params, depths)
        except BaseException:
            run_dir.discard_if_unused()
            raise
        return _finish(args, run_dir.path) if distributed.is_main() else 0
