"""Fault tests: ``rope-ext eval`` killed with SIGKILL at several points resumes with nothing lost and
nothing recomputed -- after the final rerun every cell is stored exactly once and equals the cell of
an uninterrupted run. The kill points are exact: a ``sitecustomize`` of this test (on the child's
PYTHONPATH; nothing in rope_ext) SIGKILLs the process at its N-th store append, either before the
write or after half of the record's bytes (a torn line). (Fine-tune resume: tests/test_longlora_*.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rope_ext.eval.lab import LabConfig, build_model, save_lab
from rope_ext.eval.tokens import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--lengths", "64,128,192", "--methods", "none,pi,ntk,rerope", "--docs", "2", "--no-report", "--threads", "1"]


@pytest.fixture(scope="module")
def lab_model(tmp_path_factory) -> Path:
    """An untrained 1-layer lab checkpoint (byte tokenizer) trained length 32, written to disk."""
    tokenizer = byte_tokenizer()
    cfg = LabConfig(context=32, layers=1, hidden=32, heads=2, intermediate=64, steps=1)
    out = tmp_path_factory.mktemp("lab") / "model"
    return save_lab(build_model(cfg, len(tokenizer)), tokenizer, out, {"config": {}})


KILLER = """
import os, signal
from rope_ext.eval import results

_append, _count = results.ResultStore.append, [0]
_at, _torn = int(os.environ["KILL_AT_APPEND"]), os.environ["KILL_TORN"] == "1"


def append(self, key, result, meta=None):
    _count[0] += 1
    if _count[0] == _at:
        if _torn:
            line = results.canonical({"id": results.cell_id(key), "key": key, "result": result, "meta": meta or {}})
            with open(self.path, "a") as f:
                f.write(line[: len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return _append(self, key, result, meta)


results.ResultStore.append = append
"""


def eval_process(model: Path, run_dir: Path, kill_at: int = 0, torn: bool = False, hook: Path | None = None) -> subprocess.Popen:
    path = [str(ROOT)] + ([str(hook)] if kill_at else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), KILL_AT_APPEND=str(kill_at), KILL_TORN=str(int(torn)))
    return subprocess.Popen([sys.executable, "-m", "rope_ext.cli", "eval", "ppl", "--model", str(model), "--run-dir", str(run_dir), *ARGS],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stored(run_dir: Path) -> list[dict]:
    path = run_dir / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def comparable(record: dict) -> tuple:
    result = {k: v for k, v in record["result"].items() if k not in ("seconds", "tokens_per_second")}
    return record["id"], json.dumps(result, sort_keys=True)


@pytest.mark.slow
def test_eval_killed_at_several_points_resumes_losing_and_recomputing_nothing(lab_model, tmp_path):
    reference_dir = tmp_path / "reference"
    done = eval_process(lab_model, reference_dir)
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()[-2000:]
    reference = sorted(comparable(r) for r in stored(reference_dir))
    assert len(reference) >= 10
    run_dir, hook = tmp_path / "killed", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLER)
    for kill_at, torn in ((2, False), (3, True), (5, False)):
        before = {r["id"] for r in stored(run_dir)}
        proc = eval_process(lab_model, run_dir, kill_at, torn, hook)
        assert proc.wait(timeout=300) == -signal.SIGKILL
        after = stored(run_dir)
        assert len(after) == len(before) + kill_at - 1 and before <= {r["id"] for r in after}
    final = eval_process(lab_model, run_dir)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    records = stored(run_dir)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a cell was stored twice"
    assert sorted(comparable(r) for r in records) == reference, "results differ from an uninterrupted run"
    assert len(reference) > 2 + 3 + 5


FINETUNE_KILLER = """
import os, signal
from rope_ext.longlora import checkpoint

_at, _what, _count = int(os.environ["KILL_AT"]), os.environ["KILL_WHAT"], [0]
_original = getattr(checkpoint, _what)


def killing(*args, **kwargs):
    _count[0] += 1
    if _count[0] == _at:
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(*args, **kwargs)


setattr(checkpoint, _what, killing)
"""


def finetune_process(ws: dict, out: Path, resume: bool, kill: tuple[str, int] | None = None) -> subprocess.Popen:
    from test_longlora_helpers import TRAINED

    flags = ["--model", ws["model"], "--data", ws["data"], "--output-dir", str(out), "--target-length", str(2 * TRAINED),
             "--max-steps", "6", "--save-every", "1", "--keep-checkpoints", "2", "--learning-rate", "3e-3",
             "--warmup-steps", "1", "--lora-rank", "4", "--grad-accum", "2", "--lr-scheduler", "linear", "--no-merge",
             "--cache-dir", str(ws["cache"])] + (["--resume"] if resume else [])
    path = [str(ROOT)] + ([str(ws["hook"])] if kill else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), KILL_WHAT=kill[0] if kill else "", KILL_AT=str(kill[1] if kill else 0))
    return subprocess.Popen([sys.executable, "-m", "rope_ext.cli", "finetune", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_killed_mid_save_and_between_saves_resumes_to_the_same_run(tmp_path):
    """SIGKILL while the 2nd checkpoint's tensors are written (a partial directory left behind), then
    at the 4th save before it starts (step 4 computed and logged, not saved); each resume continues
    from the last complete checkpoint and the run ends with the losses and weights of an
    uninterrupted one, bitwise."""
    from safetensors.torch import load_file
    from test_longlora_helpers import corpus, tiny_checkpoint

    from rope_ext.longlora import checkpoint as ckpt

    ws = {"model": str(tiny_checkpoint(tmp_path / "model")), "data": str(corpus(tmp_path / "corpus")),
          "cache": tmp_path / "cache", "hook": tmp_path / "hook"}
    ws["hook"].mkdir()
    (ws["hook"] / "sitecustomize.py").write_text(FINETUNE_KILLER)
    whole = finetune_process(ws, tmp_path / "whole", resume=False)
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()[-2000:]
    out = tmp_path / "killed"
    for resume, kill, complete in ((False, ("_write_tensors", 5), [1]), (True, ("save_checkpoint", 3), [2, 3])):
        proc = finetune_process(ws, out, resume, kill)
        assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        assert [step for step, _ in ckpt.complete_checkpoints(out)] == complete
    final = finetune_process(ws, out, resume=True)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    assert logged_losses(out) == logged_losses(tmp_path / "whole")
    a = load_file(ckpt.checkpoint_path(tmp_path / "whole", 6) / ckpt.WEIGHTS)
    b = load_file(ckpt.checkpoint_path(out, 6) / ckpt.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
