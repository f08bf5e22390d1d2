"""``rope-ext recommend``: one method (and its parameters) for a model and a target length.

  rope-ext recommend MODEL --target-length 32k [--finetune] [--serving] [--json]
      the method a documented rule picks (rope_ext.calc.recommend.choose), the exact parameters
      rope_ext.patch takes, why, and the runners-up
  rope-ext recommend MODEL --target-length 32k --tune --run-dir R [--budget-tokens N] [--max-candidates K] [--docs 3]
      measure the rule's methods and a few parameter variants on held-out text at the target length
      and pick the lowest perplexity past the trained length; R/results.jsonl is resumed (a rerun
      recomputes nothing) and R/tune.md holds the report

MODEL is a local checkpoint directory, a .gguf file, or the alias smollm2. Lengths: tokens (32768),
32k, or a multiple of the model's trained length (4x); see rope_ext.lengths.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
from typing import Any

from rope_ext.validate import COUNT, SEED, WORKERS, flag, integer

logger = logging.getLogger(__name__)
TUNE_DEFAULTS = {"docs": 3, "corpus": "stdlib", "seed": 0, "dtype": "float32"}
TUNE_ONLY = ("run_dir", "budget_tokens", "max_candidates", "threads", *TUNE_DEFAULTS)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("recommend", help="the method to use for a model and a target length (optionally tuned by measurement)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="local checkpoint directory, .gguf file, or alias (smollm2)")
    p.add_argument("--target-length", required=True,
                   help="target context length: tokens (32768, 32k) or a multiple of the trained length (4x)")
    p.add_argument("--finetune", action="store_true", help="you will fine-tune the model for the target length (LongLoRA / YaRN)")
    p.add_argument("--serving", action="store_true", help="the model must run in a serving engine (vLLM, llama.cpp)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    t = p.add_argument_group("measurement (--tune)")
    t.add_argument("--tune", action="store_true",
                   help="measure candidate parameter sets and pick the lowest perplexity past the trained length")
    t.add_argument("--run-dir", help="directory for results.jsonl (resumed) and the report tune.md; required with --tune")
    t.add_argument("--budget-tokens", type=flag(integer, minimum=1, maximum=1 << 40), default=None,
                   help="tokens forwarded in all (each candidate: --docs x target length); default: every candidate")
    t.add_argument("--max-candidates", type=COUNT, default=None, help="candidates measured at most (default: every candidate)")
    t.add_argument("--docs", type=COUNT, default=None, help="windows of held-out text per candidate (default: 3; 2 or more give a spread)")
    t.add_argument("--corpus", default=None, help="'stdlib' (held-out split; the default), a directory, a .jsonl or a text file")
    t.add_argument("--seed", type=SEED, default=None, help="order of the held-out documents (default: 0)")
    t.add_argument("--threads", type=WORKERS, default=None,
                   help="torch CPU threads (default: 1 when the 1-minute load average is above 1, else every core)")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="model dtype (default: float32)")
    t.add_argument("--repair", action="store_true", help="drop damaged records of --run-dir's results.jsonl and recompute them")
    p.set_defaults(func=run)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _wrap(text: str, indent: str) -> list[str]:
    width = max(40, shutil.get_terminal_size((100, 24)).columns - 2)
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ")


def render(info: dict[str, Any]) -> str:
    c = info["choice"]
    lines = [f"model: {info['model']} ({info['model_type']}; rope_ext.patch: {info['patch_support']})",
             f"trained length {info['trained_length']}, target {info['target_length']} (factor {info['factor']:g})", "",
             f"choice: {c['method']}  {_params(c['params'])}",
             f"  rope_ext.patch(model, {c['method']!r}{''.join(f', {k}={v!r}' for k, v in c['params'].items())})"]
    lines += _wrap("why: " + c["why"], "  ") + _wrap("reference: " + c["reference"], "  ")
    lines += [line for caveat in c["caveats"] for line in _wrap("caveat: " + caveat, "  ")]
    for r in c["runners_up"]:
        lines += ["", f"runner-up: {r['method']}  {_params(r['params'])}"] + _wrap(r["note"], "  ")
    return "\n".join(lines)


def _check_flags(args: argparse.Namespace) -> None:
    if not args.tune:
        given = [f"--{name.replace('_', '-')}" for name in TUNE_ONLY if getattr(args, name) is not None]
        given += ["--repair"] if args.repair else []
        if given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --tune only; add --tune or leave "
                             f"{'it' if len(given) == 1 else 'them'} out")
        return
    if args.run_dir is None:
        raise ValueError("--tune needs --run-dir R (where the measurements are stored and resumed)")
    if args.finetune:
        raise ValueError("--tune measures the model as it is, without fine-tuning; with --finetune the choice is the "
                         "method you will train with, which a measurement before training cannot rank: leave out one of them")


def run(args: argparse.Namespace) -> int:
    from rope_ext import calc
    from rope_ext.calc.recommend import choose
    from rope_ext.commands.eval import model_source
    from rope_ext.lengths import parse_length
    from rope_ext.models import load_config
    from rope_ext.patches import FAMILIES

    _check_flags(args)
    source = model_source(args.model)
    config = load_config(source)
    spec, family, unsupported = calc.rope_spec_of(config)
    target = parse_length(args.target_length, spec.trained_length, "--target-length")
    runs_attention = family is not None and FAMILIES[family].attention_interface
    choice = choose(target, spec.rotary_dim, spec.rope_theta, spec.trained_length, finetune=args.finetune,
                    serving=args.serving, attention_methods=runs_attention)
    info = {"model": str(args.model), "model_type": getattr(config, "model_type", None), "family": family,
            "patch_support": unsupported or "supported", "trained_length": spec.trained_length, "rotary_dim": spec.rotary_dim,
            "rope_theta": spec.rope_theta, "target_length": target, "factor": target / spec.trained_length,
            "choice": choice.to_dict()}
    if args.tune:
        if unsupported:
            raise ValueError(f"--tune applies methods with rope_ext.patch, which does not support this model: {unsupported}")
        info["tune"] = _tune(args, source, choice, spec, target)
    print(json.dumps(info, indent=2) if args.json else render(info) + ("\n\n" + info["tune"]["report"] if args.tune else ""))
    return 0


def _tune(args: argparse.Namespace, source: str, choice: Any, spec: Any, target: int) -> dict[str, Any]:
    """Plan within the budget (refused before anything is created), then measure into the run directory."""
    from rope_ext.eval.results import RunDir
    from rope_ext.eval.tune import REPORT, candidates, plan, tune
    from rope_ext.eval.tune import render as render_tune

    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in TUNE_DEFAULTS.items() if getattr(args, k) is None}})
    cands = candidates(choice, spec, target)
    planned = plan(cands, target, args.docs, args.budget_tokens, args.max_candidates)
    logger.info("measuring %d of %d candidates, %d tokens each", len(planned), len(cands), args.docs * target)
    run_dir = RunDir(args.run_dir, repair=args.repair)
    try:
        import torch

        import rope_ext
        from rope_ext.eval.runner import set_threads

        threads = set_threads(args.threads)
        model, tokenizer = rope_ext.load(source, dtype=getattr(torch, args.dtype))
        record = {"command": ["rope-ext", *sys.argv[1:]], "threads": threads, "dtype": args.dtype, "corpus": args.corpus}
        result = tune(model, tokenizer, planned, target, run_dir=run_dir, n_docs=args.docs, seed=args.seed, corpus=args.corpus,
                      model_name=source, record=record, left_out=cands[len(planned):], progress=not args.json)
    except BaseException:
        run_dir.discard_if_unused()
        raise
    report = render_tune(result, f"rope-ext recommend --tune: {args.model} to {target} tokens")
    (run_dir.path / REPORT).write_text(report)
    logger.info("report: %s", run_dir.path / REPORT)
    return {**result.to_dict(), "report": report, "report_path": str(run_dir.path / REPORT)}
