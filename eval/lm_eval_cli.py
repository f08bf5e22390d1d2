"""lm-eval's command line with the ``rope_ext`` model and tasks available, offline.

    python -m rope_ext.eval.lm_eval_cli --model rope_ext \\
        --model_args pretrained=PATH,method=yarn,max_length=2048 \\
        --tasks rope_ext_passkey,rope_ext_ppl --metadata '{"passkey_lengths": "1x,4x"}' --limit 20

lm-eval 0.4.13 loads no plugins (no entry point group is read), so plain ``lm_eval --model rope_ext``
cannot find the model. This entry runs lm-eval's own CLI, with the same arguments, in a process where
``rope_ext.eval`` is imported (which registers the model type and the tasks, see
``rope_ext.eval.lm_eval_tasks.register``; ``--include_path`` adds your own tasks as usual) and
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set unless they are set already. Every lm-eval option works.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .lm_eval_tasks import register

OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default: this process' arguments) with rope_ext registered."""
    for name in OFFLINE:
        os.environ.setdefault(name, "1")
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
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
