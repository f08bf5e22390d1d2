"""The ``rope-ext`` command. Thin: each subcommand lives in ``rope_ext/commands/<name>.py`` and
exposes ``add_parser(subparsers)`` (which sets ``func``) so that adding one touches no other file.
Every name in COMMANDS must import: a missing or broken module is an error naming it, never a
subcommand that silently disappears. Building the parser imports no torch and no transformers
(``rope-ext --help`` is fast): a command module imports what its work needs inside ``run()``.

Output convention: what a command produces (tables, JSON, the paths of files a script reads next)
goes to stdout with ``print``; status and progress messages go to stderr through ``logging``
(``logger = logging.getLogger(__name__)`` in each module, shown as ``rope-ext: message``). The level
is set once here: INFO by default, ``-q`` WARNING (warnings only), ``-v`` DEBUG (``-vv`` the same).
A progress bar follows it: shown only while INFO is (``logger.isEnabledFor(logging.INFO)``), so ``-q``
hides it too.
Errors stay one line, ``rope-ext COMMAND: error: ...`` on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

import rope_ext

COMMANDS = ("methods", "info", "calc", "pretrain", "eval", "report", "finetune", "lm_eval", "generate", "recommend", "export")


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


def version_line() -> str:
    """``rope-ext X.Y.Z (torch A, transformers B, python C)``, read from package metadata (nothing imported)."""
    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    return (f"rope-ext {rope_ext.__version__} ({installed('torch')}, {installed('transformers')}, "
            f"python {'.'.join(map(str, sys.version_info[:3]))})")


class VersionAction(argparse.Action):
    """``--version``: the version line on stdout, exit 0 (argparse's own would wrap it to the terminal)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_line())
        parser.exit()


class StderrHandler(logging.Handler):
    """Each message as one line on ``sys.stderr`` as it is when the message comes (pytest and
    ``contextlib.redirect_stderr`` replace it): ``rope-ext: message`` for INFO,
    ``rope-ext: warning: message`` (``debug``, ``error`` ...) for the other levels."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            sys.stderr.write(f"rope-ext: {level}{text}\n")
        except Exception:  # logging's contract: a failing handler reports itself, never raises
            self.handleError(record)


def configure_logging(verbose: int, quiet: bool) -> None:
    """rope_ext's loggers (``rope_ext.*``) to stderr at WARNING (quiet), INFO (default) or DEBUG
    (verbose); calling it again replaces the handler it installed, so there is always one."""
    logger = logging.getLogger("rope_ext")
    for handler in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(StderrHandler())
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2): the flag, what is wrong and what is allowed."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rope-ext",
        description="Run RoPE language models past their trained context length.",
    )
    parser.add_argument("--version", action=VersionAction, help="print the versions of rope-ext, torch, transformers, python and exit")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="count", default=0, help="also show debug messages (on stderr)")
    level.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only, no status messages")
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
    configure_logging(args.verbose, args.quiet)
    logging.getLogger(__name__).debug("%s; arguments %s", version_line(),
                                      {k: v for k, v in vars(args).items() if k not in ("func", "verbose", "quiet")})
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
