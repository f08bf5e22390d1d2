"""The run directory and its append-only JSONL results store.

    RUN_DIR/results.jsonl   one JSON object per finished cell: {"id", "key", "result", "meta"}
    RUN_DIR/config.json     the exact configuration of every invocation ("invocations", latest last)
    RUN_DIR/env.json        versions, platform, threads of the latest invocation
    RUN_DIR/report.md, report/*.csv, report/*.png   written by ``rope_ext.eval.report``

A cell is identified by ``cell_id(key)``, a hash of its canonical JSON key (model, method, explicit
parameters, length, mode, the tokens evaluated, seed ...). Rerunning a command skips every cell whose
id is already stored, so it resumes and recomputes nothing. Each line is appended, flushed and
fsync'ed as its cell finishes: an interruption loses at most the cell in progress. A torn last line
(killed mid-write) is ignored when reading and cut off before the next append.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
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

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        self._torn = False
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    self._torn = True
                    continue
                raise ValueError(f"{self.path}: line {i + 1} is not valid JSON; the results file is damaged") from None
            self._records[record["id"]] = record
        self._torn = self._torn or (bool(data) and not data.endswith(b"\n"))

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
        record = {"id": cell_id(key), "key": key, "result": result, "meta": meta or {}}
        if self.path is None:
            self._records[record["id"]] = record
            return record
        line = canonical(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records[record["id"]] = record
        return record


class RunDir:
    """A run directory, checked writable on creation (before any compute)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            results = self.path / RESULTS
            with open(results, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise PermissionError(f"run directory {str(self.path)!r} is not writable ({err.strerror or err}); choose another --run-dir") from None
        self.store = ResultStore(results)

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
