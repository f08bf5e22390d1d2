"""``rope-ext pretrain``: train a small Llama-architecture byte-level lab model from scratch at a short
context on an offline corpus (default: the train split of the Python standard library), or fine-tune
one for passkey retrieval (``--task passkey --init LM_DIR``). Saves a normal HF checkpoint
(safetensors + byte tokenizer + lab.json); its trained length is config.max_position_embeddings.
``--pe`` chooses the position encoding: rope, alibi, nope or a train-time encoding of
rope_ext.eval.encodings, with its parameters as ``--pe-param NAME=VALUE``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
from pathlib import Path
from typing import Any

from rope_ext.validate import COUNT, MAX_ALIBI_BIAS, MAX_BASE, MAX_COUNT, SEED, WORKERS, flag, integer, number

logger = logging.getLogger(__name__)
LM_ONLY = ("position", "pe_param", "rope_theta", "max_bias", "context", "layers", "hidden", "heads", "intermediate")  # the architecture
LAB = "the lab model's, rope_ext.eval.LabConfig"  # defaults live there (importing it here would import torch for --help)
BUILT_IN = ("rope", "alibi", "nope")


def encoding_names() -> list[str]:
    """The names ``@register``ed in rope_ext/eval/encodings/*.py, read from the source (importing the
    registry would import torch for --help); tests check they equal ``encodings.names()``."""
    spec = importlib.util.find_spec("rope_ext.eval")
    folder = Path(next(iter(spec.submodule_search_locations))) / "encodings"
    names = []
    for file in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ClassDef):
                names += [d.args[0].value for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register"
                          and d.args and isinstance(d.args[0], ast.Constant)]
    return sorted(names)


def pe_params(items: list[str]) -> tuple[tuple[str, Any], ...]:
    """["width=16", "init_c=0.5"] -> (("width", 16), ("init_c", 0.5)), values parsed as the eval CLI's."""
    from rope_ext.eval.spec import parse_value

    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--pe-param {item!r}: expected NAME=VALUE (e.g. --pe fire --pe-param width=16)")
        pairs.append((name.strip(), parse_value(value.strip())))
    return tuple(pairs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="train a small lab model at a short context (train short, test long)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--task", choices=("lm", "passkey"), default="lm", help="lm: from scratch; passkey: fine-tune --init on passkey windows")
    p.add_argument("--init", help="--task passkey: the lab LM checkpoint to start from")
    names = (*BUILT_IN, *encoding_names())
    p.add_argument("--pe", "--position", dest="position", choices=names, default=None, metavar="NAME",
                   help=f"position encoding, one of {', '.join(names)} (default: {LAB})")
    p.add_argument("--pe-param", action="append", default=None, metavar="NAME=VALUE",
                   help="a parameter of the --pe encoding (repeatable), e.g. --pe kerple_log --pe-param eps=0.02")
    p.add_argument("--rope-theta", type=flag(number, above=1, at_most=MAX_BASE), default=None, help=f"RoPE base (default: {LAB})")
    p.add_argument("--max-bias", type=flag(number, above=0, at_most=MAX_ALIBI_BIAS), default=None, help=f"ALiBi max bias (default: {LAB})")
    p.add_argument("--context", type=flag(integer, minimum=8, maximum=MAX_COUNT), default=None, help=f"trained length in tokens (bytes) (default: {LAB})")
    p.add_argument("--layers", type=COUNT, default=None, help=f"default: {LAB}")
    p.add_argument("--hidden", type=COUNT, default=None, help=f"default: {LAB}")
    p.add_argument("--heads", type=COUNT, default=None, help=f"default: {LAB}")
    p.add_argument("--intermediate", type=COUNT, default=None, help=f"default: {LAB}")
    p.add_argument("--steps", type=COUNT, default=None, help="optimizer steps (default: 400 for lm, 800 for passkey)")
    p.add_argument("--batch", type=COUNT, default=None, help=f"default: {LAB}")
    p.add_argument("--lr", type=flag(number, above=0, at_most=1), default=None, help="peak learning rate (default: 3e-3 for lm, 1e-3 for passkey)")
    p.add_argument("--seed", type=SEED, default=None, help=f"default: {LAB}")
    p.add_argument("--corpus", default=None, help=f"'stdlib', a directory, a .jsonl or a text file (train split) (default: {LAB})")
    p.add_argument("--threads", type=WORKERS, default=None, help="torch CPU threads (default: 1 if the machine is busy, else every core)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.set_defaults(func=run)


def given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The settings among ``names`` given on the command line; the config's defaults fill the rest."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    from rope_ext.eval.lab import LabConfig, is_complete, pretrain
    from rope_ext.eval.lab_passkey import PasskeyLabConfig, finetune_passkey
    from rope_ext.eval.runner import set_threads

    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} exists and is not empty{' (a finished checkpoint)' if is_complete(out) else ''}; pass --overwrite to replace it")
    training = given(args, ("steps", "batch", "lr", "seed", "corpus"))
    if args.task == "passkey":
        if not args.init:
            raise ValueError("--task passkey needs --init LM_DIR (a lab LM checkpoint)")
        if given(args, LM_ONLY):
            raise ValueError(f"--{', --'.join(n.replace('_', '-') for n in given(args, LM_ONLY))}: --task lm only; "
                             "--task passkey keeps the architecture of --init")
        if not is_complete(args.init):
            raise FileNotFoundError(f"--init {args.init!r} is not a finished lab checkpoint (no lab.json)")
        cfg = PasskeyLabConfig(**training)
        set_threads(args.threads)
        logger.info("fine-tuning %s for passkey retrieval: %s", args.init, cfg)
        print(finetune_passkey(args.init, cfg, out))
        return 0
    if args.init:
        raise ValueError(f"--init {args.init!r}: --task passkey only (--task lm trains from scratch)")
    architecture = given(args, LM_ONLY)
    if "pe_param" in architecture:
        architecture["pe_params"] = pe_params(architecture.pop("pe_param"))
    cfg = LabConfig(**architecture, **training)
    set_threads(args.threads)
    logger.info("training a lab model from scratch: %s", cfg)
    print(pretrain(cfg, out))
    return 0
