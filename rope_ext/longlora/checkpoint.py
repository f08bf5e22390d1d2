"""Checkpoints of a fine-tune, in a format that cannot run code: tensors in safetensors, everything
else in JSON. ``--resume`` never unpickles anything.

``<output_dir>/checkpoints/step_<n>/`` holds
    model.safetensors                    the trainable parameters by name (LoRA + the embed / norm copies,
                                         or all of them)
    optimizer.json + optimizer.safetensors  the optimizer's param_groups and step counters / its moments
    scheduler.json                       the learning-rate scheduler's state_dict
    training.json                        accelerate's micro-step counter and the gradient scaler's state
    rng_<rank>.json + rng_<rank>.safetensors  every process's RNG states (python / numpy in JSON, torch's
                                         as uint8 tensors)
    complete.json                        the step and the format, written last
A checkpoint is written into ``checkpoints/.step_<n>.partial`` and renamed to ``step_<n>`` once every
file is on disk, so an interrupted save never leaves a directory that resume would take. A
checkpoint directory holding a pickle-style file (an older rope-ext's, or someone else's) is refused.

FSDP and DeepSpeed keep their engine's sharded model / optimizer files (written and read by the
engine with pickle, next to the JSON / safetensors state above): resume such a run only from a
directory your own runs wrote (SECURITY.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RESUMABLE, FinetuneConfig, safe_yaml

logger = logging.getLogger(__name__)

FORMAT = 1
MARKER = "complete.json"
RUN_CONFIG = "run_config.yaml"
WEIGHTS = "model.safetensors"
OPTIMIZER, SCHEDULER, TRAINING = "optimizer", "scheduler", "training"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"
COPY = "modules_to_save.default"  # where peft keeps a trained copy of an embedding / norm


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def partial_path(path: Path) -> Path:
    """Where the checkpoint ``path`` is written before it is renamed (never matched by ``step_*``)."""
    return path.parent / f".{path.name}.partial"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint whose save finished, oldest first."""
    root = output_dir / "checkpoints"
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        marker = path / MARKER
        if marker.is_file():
            found.append((_marker_step(marker), path))
    return sorted(found)


def _marker_step(marker: Path) -> int:
    try:
        step = json.loads(marker.read_text())["step"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint marker {marker} is damaged ({err}); delete it to resume from the checkpoint before") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"checkpoint marker {marker}: step must be an integer >= 1, got {step!r}; delete it to resume "
                         "from the checkpoint before")
    return step


def prune(output_dir: Path, keep: int) -> None:
    """Delete the complete checkpoints older than the last ``keep``, and every unfinished one."""
    root = output_dir / "checkpoints"
    for _, path in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)
    for path in [*root.glob(".step_*.partial"), *root.glob("step_*")]:
        if path.is_dir() and not (path / MARKER).is_file():
            shutil.rmtree(path)


def run_settings(config: FinetuneConfig, world_size: int) -> dict[str, Any]:
    return {**config.to_dict(), "world_size": world_size}


def write_run_config(output_dir: Path, config: FinetuneConfig, world_size: int) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_text(output_dir / RUN_CONFIG, yaml.safe_dump(run_settings(config, world_size), sort_keys=False))


def check_resume(output_dir: Path, config: FinetuneConfig, world_size: int) -> None:
    """--resume continues the same run: every setting that shapes the data order or the loss
    trajectory (all but RESUMABLE) must equal the saved one."""
    saved_path = output_dir / RUN_CONFIG
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {saved_path} is missing; is {output_dir} the output_dir of a fine-tune?")
    saved = safe_yaml(saved_path.read_text(), f"--resume: {saved_path}")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {saved_path} must hold the run's settings as a mapping, got {type(saved).__name__}")
    now = run_settings(config, world_size)
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}
    saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}  # keys added since: their default
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        raise ValueError(f"--resume: settings differ from the run in {output_dir}: {'; '.join(changed)} "
                         f"(only {', '.join(RESUMABLE)} may change)")


def engine(accelerator: Any) -> str | None:
    """"FSDP" or "DEEPSPEED" when that engine owns the model and optimizer state, else None."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    return kind.value if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) else None


def check_loadable(path: Path, engine_name: str | None, trusted: bool) -> None:
    """Refuse a checkpoint that resume must not read: one holding a pickle-style file (unpickling
    can run any code) or written in another format. Under FSDP / DeepSpeed the engine's own files
    are pickles by design: refused unless ``trusted`` (``--trust-engine-checkpoints``)."""
    if engine_name is not None and not trusted:
        raise ValueError(f"--resume: this is a {engine_name} run, and {engine_name} reads its model and optimizer files in "
                         f"{path} with pickle, which can run code; resume it only if your own runs wrote this directory, "
                         "with --trust-engine-checkpoints (recipe: trust_engine_checkpoints: true); see SECURITY.md")
    if engine_name is None:
        pickles = sorted(Path(root, name) for root, _, names in os.walk(path) for name in names
                         if Path(name).suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"--resume: {pickles[0]} is a pickle-style file ({pickles[0].suffix}); rope-ext never loads "
                             f"pickle, which can run code. To continue: start a fresh run (another output_dir, or delete "
                             f"{path.parent}), or, only if you trust this directory, convert its state yourself to "
                             "safetensors + JSON in the layout of rope_ext/longlora/checkpoint.py and delete the pickle files")
    found = json.loads((path / MARKER).read_text()).get("format")
    if found != FORMAT:
        raise ValueError(f"--resume: {path / MARKER} has checkpoint format {found!r}, this rope-ext reads format {FORMAT} "
                         f"(safetensors + JSON); start a fresh run (another output_dir, or delete {path.parent})")


def engine_warning(path: Path, engine_name: str) -> str:
    return (f"warning: resuming a {engine_name} run: {engine_name} reads its model and optimizer files in {path} with "
            "pickle, which can run code; resume only checkpoints your own runs wrote (SECURITY.md)")


def save_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, path: Path, step: int) -> None:
    """Every process writes its part into the partial directory; once all have, the main process
    writes the marker and renames the directory to ``path`` (replacing an unfinished one)."""
    partial = partial_path(path)
    main = accelerator.is_main_process
    if main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if engine(accelerator) is not None:
        accelerator.save_state(str(partial))
    elif main:
        _write_tensors(partial / WEIGHTS, _trainable(accelerator.unwrap_model(model)))
        write_state(partial / OPTIMIZER, optimizer.state_dict())
    if main:
        write_state(partial / SCHEDULER, scheduler.state_dict())
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        write_state(partial / TRAINING, {"accelerator_step": accelerator.step, "scaler": scaler})
    write_state(partial / f"rng_{accelerator.process_index}", rng_state())
    accelerator.wait_for_everyone()
    if main:
        _write_text(partial / MARKER, json.dumps({"step": step, "format": FORMAT}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(partial, path)
        if os.name == "posix":
            _fsync(path.parent)


def load_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, path: Path, trusted: bool = False) -> None:
    """Restore what ``save_checkpoint`` wrote. Every file is read and checked before the model,
    optimizer, scheduler or RNGs change; ``trusted``: see ``check_loadable``."""
    engine_name = engine(accelerator)
    check_loadable(path, engine_name, trusted)
    if engine_name is not None and accelerator.is_main_process:
        logger.warning(engine_warning(path, engine_name))
    sharded = engine_name is not None
    unwrapped = accelerator.unwrap_model(model)
    weights = None if sharded else _read_tensors(path / WEIGHTS)
    optimizer_state = None if sharded else read_state(path / OPTIMIZER)
    scheduler_state = read_state(path / SCHEDULER)
    training = read_state(path / TRAINING)
    rng = read_state(path / f"rng_{accelerator.process_index}")
    if weights is not None:
        _check_weights(path / WEIGHTS, weights, _trainable(unwrapped))
    _check_training(path / f"{TRAINING}.json", training, accelerator.scaler is not None)
    _check_rng(path / f"rng_{accelerator.process_index}.json", rng)
    if sharded:
        accelerator.load_state(str(path))
    else:
        optimizer.load_state_dict(optimizer_state)
        unwrapped.load_state_dict(weights, strict=False)
    scheduler.load_state_dict(scheduler_state)
    accelerator.step = training["accelerator_step"]
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(training["scaler"])
    set_rng_state(rng)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (a tied parameter once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _check_weights(path: Path, saved: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> None:
    """The saved trainable parameters are this run's, by name, shape and dtype."""
    missing, unexpected = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    if missing or unexpected:
        older = {n.replace(f".{COPY}.", ".") for n in missing} & set(unexpected)
        hint = (f"; it was written by a rope-ext that trained {sorted(older)[0]} in place, this one trains a peft copy "
                "(modules_to_save): start a fresh run (another output_dir)") if older else ""
        raise ValueError(f"checkpoint {path} does not hold this run's trainable parameters "
                         f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}){hint}")
    for name, tensor in saved.items():
        if tensor.shape != now[name].shape or tensor.dtype != now[name].dtype:
            raise ValueError(f"checkpoint {path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, this run's is "
                             f"{now[name].dtype} {tuple(now[name].shape)}")


def _check_training(path: Path, training: Any, has_scaler: bool) -> None:
    step = training.get("accelerator_step") if isinstance(training, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint file {path}: accelerator_step must be an integer >= 0, got {step!r}")
    if has_scaler and not isinstance(training.get("scaler"), dict):
        raise ValueError(f"checkpoint file {path} holds no gradient scaler state, but this run scales gradients (fp16); "
                         "resume with the mixed_precision of the run that wrote it")


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python's and numpy's as numbers, torch's (CPU and accelerator) as
    uint8 tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
                             "torch": torch.get_rng_state(), "device": None}
    device = _accelerator_type()
    if device is not None:
        state["device"] = {"type": device, "states": _device_states(device)}
    return state


def _accelerator_type() -> str | None:
    return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else None


def _device_states(kind: str) -> list[torch.Tensor]:
    module = torch.get_device_module(kind)
    return list(module.get_rng_state_all()) if hasattr(module, "get_rng_state_all") else [module.get_rng_state()]


def _numpy_state(saved: list[Any]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = saved
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def _check_rng(path: Path, state: Any) -> None:
    """Set every saved state on a scratch generator first: a damaged one is an error naming the file."""
    try:
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(_numpy_state(state["numpy"]))
        torch.Generator().set_state(state["torch"])
        device = state["device"]
        saved = (device["type"], len(device["states"])) if device is not None else (None, 0)
        if device is not None and not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in device["states"]):
            raise TypeError("device RNG states must be uint8 tensors")
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint file {path} holds no valid RNG state ({err})") from None
    now = _accelerator_type()
    count = len(_device_states(now)) if now is not None else 0
    if saved != (now, count):
        raise ValueError(f"checkpoint file {path} holds RNG states of {saved[1]} {saved[0] or 'accelerator'} device(s), "
                         f"this process sees {count} {now or 'accelerator'} device(s); resume on the kind of machine "
                         "that wrote it")


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["device"] is not None:
        module, states = torch.get_device_module(state["device"]["type"]), state["device"]["states"]
        if hasattr(module, "set_rng_state_all"):
            module.set_rng_state_all(states)
        else:
            module.set_rng_state(states[0])


def write_state(stem: Path, value: Any) -> None:
    """``value`` (numbers, strings, None, lists, tuples, mappings, tensors) as ``<stem>.json`` plus,
    when it holds tensors, ``<stem>.safetensors``; read back exactly (types included) by ``read_state``."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(value, tensors, stem.name)
    if tensors:
        _write_tensors(Path(f"{stem}.safetensors"), tensors)
    _write_text(Path(f"{stem}.json"), json.dumps({"format": FORMAT, "state": encoded}))


def read_state(stem: Path) -> Any:
    path = Path(f"{stem}.json")
    try:
        document = json.loads(path.read_text())
        encoded = document["state"]
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing; delete {stem.parent / MARKER} to resume from the "
                                "checkpoint before") from None
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(f"checkpoint file {path} is damaged ({err}); delete {stem.parent / MARKER} to resume from the "
                         "checkpoint before") from None
    tensors_path = Path(f"{stem}.safetensors")
    tensors = _read_tensors(tensors_path) if tensors_path.exists() else {}
    try:
        return _decode(encoded, tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"checkpoint file {path} is damaged ({type(err).__name__}: {err}); delete {stem.parent / MARKER} "
                         "to resume from the checkpoint before") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {TENSOR, TUPLE, ITEMS} & set(value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a checkpoint (JSON + safetensors hold numbers, "
                    "strings, None, lists, tuples, mappings and tensors)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing; delete {path.parent / MARKER} to resume from the "
                                "checkpoint before")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint file {path} is not a readable safetensors file ({err}); delete "
                         f"{path.parent / MARKER} to resume from the checkpoint before") from None


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write to a temporary name, flush to disk, then rename: the file is whole or absent."""
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary))
    _fsync(temporary)
    os.replace(temporary, path)


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
