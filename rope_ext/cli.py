"""The ``rope-ext`` command. Thin: each subcommand lives in ``rope_ext/commands/<name>.py`` and
exposes ``add_parser(subparsers)`` (which sets ``func``) so that adding one touches no other file."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("methods", "info", "calc", "pretrain", "eval", "report", "finetune", "lm_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rope-ext",
        description="Run RoPE language models past their trained context length.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rope_ext.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"rope_ext.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as err:
        print(f"rope-ext {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
