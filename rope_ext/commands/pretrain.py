"""``rope-ext pretrain``: train a small Llama-architecture byte-level lab model from scratch at a short
context on an offline corpus (default: the train split of the Python standard library), or fine-tune
one for passkey retrieval (``--task passkey --init LM_DIR``). Saves a normal HF checkpoint
(safetensors + byte tokenizer + lab.json); its trained length is config.max_position_embeddings.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from rope_ext.validate import COUNT, MAX_ALIBI_BIAS, MAX_BASE, MAX_COUNT, SEED, WORKERS, flag, integer, number

logger = logging.getLogger(__name__)
LM_ONLY = ("position", "rope_theta", "max_bias", "context", "layers", "hidden", "heads", "intermediate")  # the architecture
LAB = "the lab model's, rope_ext.eval.LabConfig"  # defaults live there (importing it here would import torch for --help)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="train a small lab model at a short context (train short, test long)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--task", choices=("lm", "passkey"), default="lm", help="lm: from scratch; passkey: fine-tune --init on passkey windows")
    p.add_argument("--init", help="--task passkey: the lab LM checkpoint to start from")
    p.add_argument("--position", choices=("rope", "alibi", "nope"), default=None, help=f"position encoding (default: {LAB})")
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
    cfg = LabConfig(**given(args, LM_ONLY), **training)
    set_threads(args.threads)
    logger.info("training a lab model from scratch: %s", cfg)
    print(pretrain(cfg, out))
    return 0
