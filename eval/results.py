"""The run directory and its append-only JSONL results store.

    RUN_DIR/results.jsonl   one JSON object per finished cell: {"id", "key", "result", "meta"}
    RUN_DIR/config.json     the exact configuration of every invocation ("invocations", latest last)
    RUN_DIR/env.json        versions, platform, threads of the latest invocation
    RUN_DIR/report.md, report/*.csv, report/*.png   written by ``rope_ext.eval.report``

A cell is identified by ``cell_id(key)``, a hash of its canonical JSON key (model, method, explicit
parameters, length, mode, the tokens evaluated, seed ...). Rerunning a command skips every cell whose
id is already stored, so it resumes and recomputes nothing. Each line is appended, flushed and
fsync'ed as its cell finishes: an interruption loses at most the cell in progress. A torn last line
(killed mid-write: not valid JSON) is ignored when reading and cut off before the next append; a
complete last record that only lacks its newline is kept (the newline is added before the next
append). Any other damaged line (not JSON, or not a record of this store) is an error naming the file
and the line; ``repair=True`` (``--repair`` on the command line) drops the damaged lines after saying
which, so that their cells are recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
CONFIG = "config.json"
ENV = "env.json"


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:20]


class ResultStore:
    """Append-only JSONL of finished cells, keyed by ``cell_id`` (in memory only when ``path`` is None)."""

    def __init__(self, path: str | Path | None, repair: bool = False, check: Callable[[dict], str | None] | None = None):
        self.path = None if path is None else Path(path)
        self._check = check
        self._records: dict[str, dict[str, Any]] = {}
        self._torn = False
        self._needs_newline = False
        self._read(repair)

    def _read(self, repair: bool) -> None:
        if self.path is None or not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        damaged = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            last = i == len(lines) - 1
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if last:
                    self._torn = True
                else:
                    damaged.append((i, "not valid JSON"))
                continue
            problem = record_problem(record) or (self._check(record) if self._check else None)
            if problem:
                damaged.append((i, problem))
                continue
            self._records[record["id"]] = record
            self._needs_newline = last
        if damaged:
            where = "; ".join(f"line {i + 1}: {why}" for i, why in damaged)
            if not repair:
                raise ValueError(f"{self.path}: damaged record(s) ({where}); nothing was changed. Rerun with --repair "
                                 f"(ResultStore(..., repair=True)) to drop them and recompute their cells")
            warnings.warn(f"{self.path}: dropping damaged record(s) ({where}); their cells will be recomputed", stacklevel=3)
            dropped = {i for i, _ in damaged} | ({len(lines) - 1} if self._torn else set())
            self._rewrite([line for i, line in enumerate(lines) if line.strip() and i not in dropped])

    def _rewrite(self, lines: list[bytes]) -> None:
        """Replace the file by ``lines`` atomically (a temporary file renamed over it)."""
        tmp = self.path.with_name(f".{self.path.name}.repair")
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._torn = self._needs_newline = False

    def __contains__(self, key: dict[str, Any]) -> bool:
        return cell_id(key) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        return self._records.get(cell_id(key))

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def _cut_torn_tail(self) -> None:
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        with open(self.path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())
        self._torn = False

    def append(self, key: dict[str, Any], result: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store one finished cell durably (append, flush, fsync) and return its record."""
        if self._torn:
            self._cut_torn_tail()
        record = {"id": cell_id(key), "key": key, "result": result, "meta": {} if meta is None else meta}
        if self.path is None:
            self._records[record["id"]] = record
            return record
        line = ("\n" if self._needs_newline else "") + canonical(record) + "\n"
        self._needs_newline = False
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records[record["id"]] = record
        return record


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a record of this store (None if it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for field, kind in (("id", str), ("key", dict), ("result", dict)):
        if not isinstance(record.get(field), kind):
            return f"field {field!r} missing or not a {kind.__name__}"
    if not isinstance(record.get("meta", {}), dict):
        return "field 'meta' is not an object"
    if record["id"] != cell_id(record["key"]):
        return "its id does not match its key"
    return None


class RunDir:
    """A run directory, checked writable on creation (before any compute). ``discard_if_unused``
    removes what creating it made when a command fails before storing any result."""

    def __init__(self, path: str | Path, repair: bool = False):
        self.path = Path(path).expanduser()
        results = self.path / RESULTS
        self._made = [p for p in (*reversed(self.path.parents), self.path) if not p.exists()]
        self._made_results = not results.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            with open(results, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise PermissionError(f"run directory {str(self.path)!r} is not writable ({err.strerror or err}); choose another --run-dir") from None
        self.store = ResultStore(results, repair=repair)

    def discard_if_unused(self) -> None:
        """After a failed command: if no result was stored, remove the results file and the
        directories this RunDir created (config.json / env.json written meanwhile go with them)."""
        results = self.path / RESULTS
        if len(self.store) or not self._made_results or (results.exists() and results.stat().st_size):
            return
        results.unlink(missing_ok=True)
        if self._made:
            for name in (CONFIG, ENV):
                (self.path / name).unlink(missing_ok=True)
            for folder in reversed(self._made):
                try:
                    folder.rmdir()
                except OSError:
                    return

    def write_json(self, name: str, obj: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.path / name)

    def write_config(self, config: dict[str, Any]) -> None:
        """Add ``config`` to config.json's "invocations" (every distinct configuration run into this
        directory, latest last; rerunning the same one moves it to the end instead of repeating it)."""
        path = self.path / CONFIG
        invocations = []
        if path.is_file():
            try:
                invocations = json.loads(path.read_text()).get("invocations", [])
            except (json.JSONDecodeError, AttributeError):
                invocations = []
        text = canonical(config)
        invocations = [c for c in invocations if canonical(c) != text] + [json.loads(text)]
        self.write_json(CONFIG, {"invocations": invocations})

    def write_env(self, threads: int) -> None:
        self.write_json(ENV, environment(threads))


def environment(threads: int) -> dict[str, Any]:
    """Versions, platform and CPU facts worth keeping next to timings and results."""
    import torch
    import transformers

    import rope_ext

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "rope_ext": rope_ext.__version__, "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": threads, "loadavg_1min": load, "device": "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
