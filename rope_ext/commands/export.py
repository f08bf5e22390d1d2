"""``rope-ext export MODEL --method yarn --factor 4 --to llama.cpp|vllm``: the serving-engine settings
under which llama.cpp or vLLM compute the same frequencies and attention factor as ``rope_ext.patch``.

    rope-ext export smollm2 --method yarn --factor 4 --to vllm            # hf_overrides + vllm serve line
    rope-ext export smollm2 --method yarn --factor 4 --to llama.cpp       # llama-server flags
    rope-ext export smollm2 --method yarn --target-length 4x --to llama.cpp --out smollm2-yarn4.gguf
    rope-ext export ./ckpt --method pi --param factor=2 --to vllm --out overrides.json

MODEL is a checkpoint directory, a .gguf file or smollm2; only its config is read (the weights only
when a GGUF is written). Methods an engine cannot run with the same formula are refused.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from rope_ext.validate import flag, number

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="llama.cpp flags / GGUF or vLLM overrides reproducing a patch",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="checkpoint directory, .gguf file, or smollm2")
    p.add_argument("--method", default="none", help="a registered method (default none: plain RoPE)")
    p.add_argument("--factor", type=flag(number, above=0), default=None, help="the method's scale factor")
    p.add_argument("--target-length", default=None, help="the method's target length instead of --factor: tokens "
                   "(32768, 32k) or a multiple of the trained length (4x)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (repeatable)")
    p.add_argument("--context-length", default=None, help="context the engine serves (-c / --max-model-len); "
                   "default: what the method reaches, trained length x factor")
    p.add_argument("--to", required=True, choices=("llama.cpp", "vllm"), help="the serving engine")
    p.add_argument("--out", default=None,
                   help="llama.cpp: a .gguf to write (from a GGUF model); vllm: a .json of the hf_overrides")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the settings as JSON")
    p.set_defaults(func=run)


def method_params(args: argparse.Namespace, trained: int) -> dict[str, Any]:
    """--param items plus --factor / --target-length, a name given twice refused."""
    from rope_ext.commands.generate import parse_params
    from rope_ext.lengths import parse_length

    params = parse_params(args.param)
    for name, value in (("factor", args.factor), ("target_length", args.target_length)):
        if value is None:
            continue
        if name in params:
            raise ValueError(f"{name} is given twice (--{name.replace('_', '-')} and --param {name}=); give it once")
        params[name] = value if name == "factor" else parse_length(value, trained, name="--target-length")
    return params


def check_out(args: argparse.Namespace, facts) -> None:
    """--out refused before anything is written: a GGUF only from a GGUF with --to llama.cpp, a .json for vllm."""
    from pathlib import Path

    from rope_ext.export.llama_cpp import check_gguf_out

    if args.out is None:
        return
    if args.to == "llama.cpp":
        if facts.gguf is None:
            raise ValueError(f"--out {args.out!r}: writing a GGUF needs a .gguf model (or smollm2); {args.model!r} is not "
                             "one. Convert it with llama.cpp's convert_hf_to_gguf.py, then export from that file; the "
                             "printed flags and --override-kv strings already work with any converted GGUF")
        check_gguf_out(facts.gguf, args.out, args.force)
        return
    path = Path(args.out)
    if path.suffix.lower() != ".json":
        raise ValueError(f"--out {args.out!r} must name a .json file for --to vllm")
    if not path.parent.resolve().is_dir():
        raise FileNotFoundError(f"--out directory does not exist: {str(path.parent)!r}")
    if path.exists() and not args.force:
        raise FileExistsError(f"--out {args.out!r} exists; pass --force to replace it")


def render(result: dict[str, Any]) -> str:
    if result["engine"] == "vllm":
        return "\n".join([f"# vLLM, {result['method']}: hf_overrides", json.dumps(result["hf_overrides"], indent=2),
                          "# command line", result["command"], "# Python", result["python"]])
    lines = [f"# llama.cpp, {result['method']}: llama-cli / llama-server flags", " ".join(result["flags"])]
    if result["override_kv"]:
        lines += ["# with", *(f"--override-kv {kv}" for kv in result["override_kv"])]
    return "\n".join([*lines, "# command line", result["command"]])


def run(args: argparse.Namespace) -> int:
    import os

    from rope_ext import export
    from rope_ext.lengths import parse_length

    engine = export.llama_cpp if args.to == "llama.cpp" else export.vllm
    engine.check_name(args.method)
    facts = export.model_facts(args.model)
    params = method_params(args, facts.spec.trained_length)
    method = export.bind(args.method, params, facts)
    engine.check(method)
    context = None if args.context_length is None else parse_length(args.context_length, method.trained_length,
                                                                    name="--context-length", minimum=2)
    check_out(args, facts)
    build = export.llama_cpp_settings if args.to == "llama.cpp" else export.vllm_settings
    result = build(method, facts, export.context_length(method, context))
    if args.out is not None and args.to == "llama.cpp":
        result["gguf"] = str(export.write_gguf(facts.gguf, args.out, result["metadata"], force=args.force))
    elif args.out is not None:
        tmp = f"{args.out}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(result["hf_overrides"], f, indent=2, sort_keys=True)
            os.replace(tmp, args.out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        result["json"] = args.out
        logger.info("wrote %s", args.out)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
