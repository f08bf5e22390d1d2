"""Checkpoints of a fine-tune: accelerate's save_state / load_state (optimizer, scheduler, every
process's RNG states, step) in ``<output_dir>/checkpoints/step_<n>``, a marker written once a
checkpoint is complete, pruning of old ones, and the run's settings for checking ``--resume``.

With LoRA on one process or DDP only the trainable parameters are stored (the frozen base is
reloaded from the model it came from): megabytes instead of the whole model. FSDP and DeepSpeed
keep accelerate's own sharded format.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from .config import RESUMABLE, FinetuneConfig

MARKER = "complete.json"
RUN_CONFIG = "run_config.yaml"
WEIGHTS = "model.safetensors"  # accelerate's name for the first model's weights


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint whose save finished, oldest first."""
    root = output_dir / "checkpoints"
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        marker = path / MARKER
        if marker.is_file():
            found.append((int(json.loads(marker.read_text())["step"]), path))
    return sorted(found)


def mark_complete(path: Path, step: int) -> None:
    (path / MARKER).write_text(json.dumps({"step": step}))


def prune(output_dir: Path, keep: int) -> None:
    for _, path in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def run_settings(config: FinetuneConfig, world_size: int) -> dict[str, Any]:
    return {**config.to_dict(), "world_size": world_size}


def write_run_config(output_dir: Path, config: FinetuneConfig, world_size: int) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG).write_text(yaml.safe_dump(run_settings(config, world_size), sort_keys=False))


def check_resume(output_dir: Path, config: FinetuneConfig, world_size: int) -> None:
    """--resume continues the same run: every setting that shapes the data order or the loss
    trajectory (all but RESUMABLE) must equal the saved one."""
    saved_path = output_dir / RUN_CONFIG
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {saved_path} is missing; is {output_dir} the output_dir of a fine-tune?")
    saved = yaml.safe_load(saved_path.read_text())
    now = run_settings(config, world_size)
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        raise ValueError(f"--resume: settings differ from the run in {output_dir}: {'; '.join(changed)} "
                         f"(only {', '.join(RESUMABLE)} may change)")


def keep_trainable_only(accelerator: Any) -> None:
    """Make accelerate store only the parameters that train, and load them back strictly."""

    def trainable(model) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            names = trainable(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def on_load(models, input_dir) -> None:
        for i, model in enumerate(models):
            state = load_file(str(Path(input_dir) / (WEIGHTS if i == 0 else WEIGHTS.replace(".", f"_{i}.", 1))))
            names = trainable(model)
            if set(state) != names:
                raise ValueError(f"checkpoint {input_dir} does not hold this run's trainable parameters "
                                 f"(missing: {sorted(names - set(state))[:5]}, unexpected: {sorted(set(state) - names)[:5]})")
            model.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)
