"""``rope-ext lm-eval [LM-EVAL ARGS ...]``: EleutherAI's lm-evaluation-harness with ``--model rope_ext``
and the tasks rope_ext_passkey / rope_ext_ppl available, offline. Every argument goes to lm-eval
unchanged (see ``rope_ext.eval.lm_eval_cli``), e.g.

    rope-ext lm-eval --model rope_ext --model_args pretrained=PATH,method=yarn,max_length=512 \\
        --tasks rope_ext_passkey --metadata '{"passkey_lengths": "1x,4x"}' --limit 20 --device cpu
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    # prefix_chars="\0": no argument looks like an option here, so all of them (-h included) reach lm-eval.
    parser = subparsers.add_parser("lm-eval", help="run lm-evaluation-harness with the rope_ext model and tasks",
                                   description=__doc__, add_help=False, prefix_chars="\0",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM-EVAL ARGS")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rope_ext.eval.lm_eval_cli import main

    return main(args.lm_eval_args or ["--help"])
