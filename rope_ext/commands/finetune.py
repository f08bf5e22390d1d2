"""``rope-ext finetune``: LongLoRA fine-tuning (S2-Attn + LoRA+) to a longer context.

In this process by default; with ``--num-processes N`` or ``--accelerate-config FILE`` the checked
settings are handed to ``accelerate launch -m rope_ext.longlora.train`` (DDP, or FSDP / DeepSpeed
with the example configs in recipes/accelerate/).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rope_ext.validate import WORKERS

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    from rope_ext.longlora.config import add_arguments

    parser = subparsers.add_parser(
        "finetune", help="LongLoRA fine-tune to a longer context (S2-Attn + LoRA + trainable embed/norm)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--num-processes", type=WORKERS, default=1, help="processes to launch with accelerate (default: 1, in this process)")
    parser.add_argument("--accelerate-config", help="an accelerate config file (e.g. recipes/accelerate/ddp.yaml) to launch with")
    parser.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(recipe: Path, num_processes: int, accelerate_config: str | None) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` of the training module with a resolved recipe, and its environment.

    Without a config file: torchrun-style processes (``--multi_gpu``); on a machine without CUDA
    with ACCELERATE_USE_CPU set, which makes accelerate run them as multi-CPU DDP over gloo
    (``accelerate launch --cpu`` starts a single process unless MPI is used)."""
    import torch

    env = dict(os.environ)
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", accelerate_config]
        if num_processes > 1:
            command += ["--num_processes", str(num_processes)]
    else:
        command += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        if num_processes > 1:
            command.append("--multi_gpu")
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
    return command + ["-m", "rope_ext.longlora.train", "--recipe", str(recipe)], env


def run(args: argparse.Namespace) -> int:
    from rope_ext.longlora.config import config_from_args
    from rope_ext.longlora.data import collect_files
    from rope_ext.longlora.train import train

    if args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate config {args.accelerate_config!r} not found")
    config = config_from_args(args)
    collect_files(config.data, config.data_extensions)
    if args.num_processes == 1 and not args.accelerate_config:
        train(config)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        command, env = launch_command(recipe, args.num_processes, args.accelerate_config)
        logger.info("handing the checked settings to accelerate launch (%d process%s)", args.num_processes,
                    "" if args.num_processes == 1 else "es")
        logger.debug("running %s", " ".join(command))
        return subprocess.call(command, env=env)
