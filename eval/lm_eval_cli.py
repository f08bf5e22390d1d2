"""lm-eval's command line with the ``rope_ext`` model and tasks available, offline.

    python -m rope_ext.eval.lm_eval_cli --model rope_ext \\
        --model_args pretrained=PATH,method=yarn,max_length=2048 \\
        --tasks rope_ext_passkey,rope_ext_ppl --metadata '{"passkey_lengths": "1x,4x"}' --limit 20

lm-eval 0.4.13 loads no plugins (its model registry holds only its own models, and no entry point
group is read), so plain ``lm_eval --model rope_ext`` cannot find the model. This entry imports the
registration (``rope_ext.eval.lm_eval_model``), adds the directory of the shipped task configs as
``--include_path`` when none is given (with your own ``--include_path``, name the rope_ext tasks by
their YAML path instead, e.g. ``--tasks $(python -c 'import rope_ext.eval.lm_eval_tasks as t;
print(t.TASKS_DIR)')/rope_ext_passkey.yaml``), sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE unless they
are set, then runs lm-eval's own CLI with the same arguments. Every lm-eval option works as usual.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def lm_eval_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` for lm-eval with our task directory as ``--include_path`` (unless one is given)."""
    from .lm_eval_tasks import TASKS_DIR

    args = list(argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return args
    if not args or args[0] in ("-h", "--help"):
        return args
    if args[0] in ("ls", "validate", "run"):
        return [args[0], "--include_path", str(TASKS_DIR), *args[1:]]
    return ["run", "--include_path", str(TASKS_DIR), *args]


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default: this process' arguments) with rope_ext registered."""
    for name in OFFLINE:
        os.environ.setdefault(name, "1")
    from lm_eval.__main__ import cli_evaluate

    importlib.import_module(f"{__package__}.lm_eval_model")  # registers --model rope_ext

    args = lm_eval_argv(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"rope_ext lm-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
