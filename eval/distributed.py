"""Evaluation over N processes (``rope-ext eval ... --num-processes N``, or the command started by
``accelerate launch`` / ``torchrun``): the cells not yet stored are dealt out round-robin over the
processes; rank 0 appends what it computes to RUN_DIR/results.jsonl as usual, every other rank to its
own RUN_DIR/ranks/results-<rank>.jsonl (same format: durable, fsync'ed per cell), and at the end rank
0 merges those into results.jsonl and deletes them. Rank files left by an interrupted run are merged
first, so rerunning recomputes nothing that finished. Only rank 0 writes config.json, env.json and
the report. The processes meet over gloo (CPU), whatever device the model runs on.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .results import ResultStore, RunDir

RANKS = "ranks"
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int


_active: Ranks | None = None


def launched_world() -> int:
    """The number of processes this one was launched among (WORLD_SIZE of accelerate / torchrun), 1 if none."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer (set by accelerate launch / torchrun), got {value!r}")
    return int(value)


def is_main() -> bool:
    return _active is None or _active.rank == 0


@contextlib.contextmanager
def sharing() -> Iterator[Ranks | None]:
    """Inside the block, ``run_cells`` shares its cells with the other launched processes (none when
    this process was launched alone)."""
    global _active
    if launched_world() == 1:
        yield None
        return
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    _active = Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
    try:
        yield _active
    finally:
        _active = None


def _rank_files(store: ResultStore) -> Path:
    if store.path is None:
        raise ValueError("evaluation over several processes needs a run directory (run_dir) to merge their results into")
    return store.path.parent / RANKS


def share(todo: list[T], store: ResultStore) -> tuple[list[T], ResultStore]:
    """This process's cells of ``todo`` and the store it appends them to."""
    if _active is None:
        return todo, store
    folder = _rank_files(store)
    if _active.rank == 0:
        return todo[::_active.world], store
    folder.mkdir(exist_ok=True)
    return todo[_active.rank::_active.world], ResultStore(folder / f"results-{_active.rank:05d}.jsonl")


def merged(store: ResultStore) -> ResultStore:
    """When sharing: every process waits until rank 0 has moved the records of the rank files into
    ``store``, then reads it afresh; returns the store holding every rank's results."""
    if _active is None:
        return store
    folder = _rank_files(store)
    torch.distributed.barrier()
    if _active.rank == 0 and folder.is_dir():
        for path in sorted(folder.glob("results-*.jsonl")):
            for record in ResultStore(path).records():
                if record["key"] not in store:
                    store.append(record["key"], record["result"], record["meta"])
            path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()
    torch.distributed.barrier()
    return store if _active.rank == 0 else ResultStore(store.path)


class WorkerRunDir(RunDir):
    """The run directory as a rank other than 0 sees it: it reads results.jsonl, writes no
    config.json / env.json (rank 0 does), and never removes anything."""

    def write_json(self, name: str, obj: Any) -> None:
        return None

    def discard_if_unused(self) -> None:
        return None


def run_dir(path: str | Path, repair: bool) -> RunDir:
    """The run directory for this process: alone or rank 0, the full one (created, repaired if asked);
    the other ranks open it after rank 0 has."""
    if _active is None:
        return RunDir(path, repair=repair)
    made = RunDir(path, repair=repair) if _active.rank == 0 else None
    torch.distributed.barrier()
    return made or WorkerRunDir(path)


def launch(argv: list[str], processes: int) -> int:
    """Run ``rope-ext <argv>`` as ``processes`` processes through ``accelerate launch`` (CPU: DDP-style
    processes over gloo, as the fine-tune launches them) and return its exit code."""
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("--num-processes launches the processes with accelerate, which is not installed: "
                          "pip install 'rope-ext[train]' (or start them yourself with torchrun)")
    env = dict(os.environ)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "--multi_gpu"]
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.call([*command, "-m", "rope_ext.cli", *argv], env=env)
