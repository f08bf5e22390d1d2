"""``rope-ext pretrain``: train a small Llama-architecture byte-level lab model from scratch at a short
context on an offline corpus (default: the train split of the Python standard library), or fine-tune
one for passkey retrieval (``--task passkey --init LM_DIR``). Saves a normal HF checkpoint
(safetensors + byte tokenizer + lab.json); its trained length is config.max_position_embeddings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rope_ext.validate import COUNT, MAX_ALIBI_BIAS, MAX_BASE, MAX_COUNT, SEED, WORKERS, flag, integer, number


def add_parser(subparsers) -> None:
    from rope_ext.eval.lab import LabConfig

    d = LabConfig()
    p = subparsers.add_parser("pretrain", help="train a small lab model at a short context (train short, test long)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--task", choices=("lm", "passkey"), default="lm", help="lm: from scratch; passkey: fine-tune --init on passkey windows")
    p.add_argument("--init", help="--task passkey: the lab LM checkpoint to start from")
    p.add_argument("--position", choices=("rope", "alibi", "nope"), default=d.position, help="position encoding (default: rope)")
    p.add_argument("--rope-theta", type=flag(number, above=1, at_most=MAX_BASE), default=d.rope_theta, help=f"RoPE base (default: {d.rope_theta:g})")
    p.add_argument("--max-bias", type=flag(number, above=0, at_most=MAX_ALIBI_BIAS), default=d.max_bias, help=f"ALiBi max bias (default: {d.max_bias:g})")
    p.add_argument("--context", type=flag(integer, minimum=8, maximum=MAX_COUNT), default=d.context, help=f"trained length in tokens (bytes) (default: {d.context})")
    p.add_argument("--layers", type=COUNT, default=d.layers)
    p.add_argument("--hidden", type=COUNT, default=d.hidden)
    p.add_argument("--heads", type=COUNT, default=d.heads)
    p.add_argument("--intermediate", type=COUNT, default=d.intermediate)
    p.add_argument("--steps", type=COUNT, default=None, help="optimizer steps (default: 400 for lm, 800 for passkey)")
    p.add_argument("--batch", type=COUNT, default=d.batch)
    p.add_argument("--lr", type=flag(number, above=0, at_most=1), default=None, help="peak learning rate (default: 3e-3 for lm, 1e-3 for passkey)")
    p.add_argument("--seed", type=SEED, default=d.seed)
    p.add_argument("--corpus", default=d.corpus, help="'stdlib', a directory, a .jsonl or a text file (train split)")
    p.add_argument("--threads", type=WORKERS, default=None, help="torch CPU threads (default: 1 if the machine is busy, else every core)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rope_ext.eval.lab import LabConfig, is_complete, pretrain
    from rope_ext.eval.lab_passkey import PasskeyLabConfig, finetune_passkey
    from rope_ext.eval.runner import set_threads

    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} exists and is not empty{' (a finished checkpoint)' if is_complete(out) else ''}; pass --overwrite to replace it")
    if args.task == "passkey":
        if not args.init:
            raise ValueError("--task passkey needs --init LM_DIR (a lab LM checkpoint)")
        if not is_complete(args.init):
            raise FileNotFoundError(f"--init {args.init!r} is not a finished lab checkpoint (no lab.json)")
        d = PasskeyLabConfig()
        cfg = PasskeyLabConfig(steps=d.steps if args.steps is None else args.steps, batch=args.batch,
                               lr=d.lr if args.lr is None else args.lr, seed=args.seed, corpus=args.corpus)
        set_threads(args.threads)
        print(finetune_passkey(args.init, cfg, out))
        return 0
    cfg = LabConfig(context=args.context, layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                    position=args.position, rope_theta=args.rope_theta, max_bias=args.max_bias,
                    steps=LabConfig.steps if args.steps is None else args.steps, batch=args.batch,
                    lr=LabConfig.lr if args.lr is None else args.lr, seed=args.seed, corpus=args.corpus)
    set_threads(args.threads)
    print(pretrain(cfg, out))
    return 0
