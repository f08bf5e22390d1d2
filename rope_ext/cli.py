"""The ``rope-ext`` command. Thin: each subcommand lives in ``rope_ext/commands/<name>.py`` and
exposes ``add_parser(subparsers)`` (which sets ``func``) so that adding one touches no other file.
Every name in COMMANDS must import: a missing or broken module is an error naming it, never a
subcommand that silently disappears."""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

COMMANDS = ("methods", "info", "calc", "pretrain", "eval", "report", "finetune", "lm_eval", "generate")


def load_command(name: str) -> ModuleType:
    """The module ``rope_ext.commands.<name>``; an ImportError naming the subcommand and the
    underlying error when it is missing, fails to import, or has no ``add_parser``."""
    module_name = f"rope_ext.commands.{name}"
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error raised while importing it: the module is broken
        raise ImportError(f"subcommand {name!r} is unavailable: importing {module_name} failed "
                          f"({type(err).__name__}: {err})") from err
    if not callable(getattr(module, "add_parser", None)):
        raise ImportError(f"subcommand {name!r} is unavailable: {module_name} has no add_parser(subparsers)")
    return module


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2): the flag, what is wrong and what is allowed."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rope-ext",
        description="Run RoPE language models past their trained context length.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        load_command(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ImportError as err:
        print(f"rope-ext: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse's own error (one line, already printed) or --help
        return exit.code if isinstance(exit.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as err:
        print(f"rope-ext {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
