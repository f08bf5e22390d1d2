"""The grid loop shared by every evaluation: skip stored cells, compute the rest with a progress bar,
store each as it finishes; plus CPU-thread choice, model identity and method application."""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import rope_ext
from rope_ext.validate import MAX_WORKERS, integer

from . import distributed
from .results import ResultStore
from .spec import SLIDING, resolve


def choose_threads(requested: int | None = None) -> int:
    """``requested``, else 1 when the machine is already busy (1-minute load average > 1: with another
    process on 2 cores, torch's default of one thread per core ran 4.5x slower than 1 thread), else
    every core."""
    if requested is not None:
        return integer(requested, "threads (requested)", minimum=1, maximum=MAX_WORKERS)
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > 1
    return 1 if busy else (os.cpu_count() or 1)


def set_threads(requested: int | None = None) -> int:
    threads = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads


def model_identity(model: torch.nn.Module, name: str | None = None) -> dict[str, str]:
    """{"name", "fingerprint"}: the fingerprint hashes every parameter's name, shape, dtype, first
    and last values and sum, so a retrained checkpoint at the same path is a different model."""
    h = hashlib.sha256()
    with torch.no_grad():
        for pname, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            h.update(f"{pname}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[:256].float().numpy().tobytes() + flat[-256:].float().numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
    return {"name": str(name), "fingerprint": h.hexdigest()[:16]}


def loaded_method(model: torch.nn.Module) -> str | None:
    """The position encoding a model was trained with when rope_ext's methods do not apply to it (an
    ALiBi / NoPE lab model, or a train-time encoding that is not RoPE-based), else None."""
    from .lab import trained_encoding

    handle = rope_ext.current(model)
    if handle is not None:
        return handle.name
    encoding = trained_encoding(model)
    return encoding.name if encoding is not None and not encoding.rope_based else None


@contextlib.contextmanager
def applied(model: torch.nn.Module, method: str, params: dict[str, Any]) -> Iterator[None]:
    """The model with ``method`` on for the block. "none" (and "sliding_window") leave the model as
    loaded: plain, or with the position encoding it was trained with (ALiBi / NoPE lab models)."""
    native = loaded_method(model)
    if method in ("none", SLIDING):
        yield
        return
    if native is not None:
        raise ValueError(f"this model was trained with {native}; only 'none' (the model as loaded) and "
                         f"'{SLIDING}' apply to it, not {method!r}")
    try:
        rope_ext.patch(model, method, **params)
    except TypeError as err:
        raise ValueError(str(err)) from None
    try:
        yield
    finally:
        rope_ext.unpatch(model)


def check_methods(model: torch.nn.Module, runs: list[tuple[str, dict[str, Any]]]) -> None:
    """Patch and unpatch once per (method, params) so every bad parameter fails before any compute."""
    for method, params in runs:
        if method == SLIDING:
            for name, value in params.items():
                if name not in ("window", "stride") or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{SLIDING}: parameters are window and stride (integers >= 1), got {name}={value!r}")
            continue
        with applied(model, method, params):
            pass


def resolve_runs(model: torch.nn.Module, names: list[str], lengths: list[int], spec: Any,
                 method_params: dict[str, dict[str, Any]] | None, task: str) -> dict[tuple[str, int], dict[str, Any]]:
    """{(method, length): parameters} of a retrieval task (passkey, RULER), every one checked by a patch
    before any compute: the given ``method_params`` over each method's defaults for the length."""
    if SLIDING in names:
        raise ValueError(f"methods: {SLIDING} is a perplexity baseline; it does not apply to {task}")
    given = method_params or {}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"method_params for {', '.join(unknown)}, which are not among the methods run: {', '.join(names)}")
    runs = {(m, L): resolve(m, given.get(m, {}), L, spec) for L in lengths for m in names}
    check_methods(model, [(m, p) for (m, _), p in runs.items()])
    return runs


@dataclass
class Cell:
    key: dict[str, Any]
    label: str
    compute: Callable[[], dict[str, Any]]


def run_cells(cells: list[Cell], store: ResultStore, desc: str, progress: bool = True) -> list[dict[str, Any]]:
    """Records of every cell, in order: stored ones as they are, the others computed now (each
    appended to the store the moment it finishes; shared with the other processes inside
    ``distributed.sharing()``)."""
    store = distributed.merged(store)
    todo, target = distributed.share([c for c in cells if c.key not in store], store)
    bar = tqdm(total=len(todo), desc=desc, dynamic_ncols=True, disable=not progress or not todo)
    for cell in todo:
        bar.set_postfix_str(cell.label)
        start = time.perf_counter()
        result = cell.compute()
        target.append(cell.key, result, {"seconds": round(time.perf_counter() - start, 3),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": torch.get_num_threads()})
        bar.update(1)
    bar.close()
    store = distributed.merged(store)
    return [store.get(c.key) for c in cells]
