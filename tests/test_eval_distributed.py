"""Evaluation over N processes: 2 CPU processes (accelerate launch, gloo) share the cells and merge
them into one results store equal to a 1-process run; a rerun merges what an interrupted run left in
its rank files and recomputes nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rope_ext import cli
from rope_ext.eval import distributed
from rope_ext.eval.lab import LabConfig, build_model, save_lab
from rope_ext.eval.tokens import byte_tokenizer

ARGS = ["--lengths", "32,64", "--methods", "none,pi,rerope", "--method-params", "rerope.window=16", "--docs", "2",
        "--no-report", "--threads", "1"]


@pytest.fixture(scope="module")
def lab_model(tmp_path_factory) -> Path:
    tokenizer = byte_tokenizer()
    cfg = LabConfig(context=32, layers=1, hidden=32, heads=2, intermediate=64, steps=1)
    return save_lab(build_model(cfg, len(tokenizer)), tokenizer, tmp_path_factory.mktemp("lab") / "model", {"config": {}})


def records(run_dir: Path) -> dict[str, dict]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    found = {r["id"]: r for r in map(json.loads, lines)}
    assert len(found) == len(lines)
    return found


def two_processes(lab_model: Path, run_dir: Path) -> subprocess.CompletedProcess:
    argv = ["eval", "ppl", "--model", str(lab_model), "--run-dir", str(run_dir), *ARGS, "--num-processes", "2"]
    return subprocess.run([sys.executable, "-m", "rope_ext.cli", *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_merge_into_the_results_of_one_and_resume_recomputes_nothing(lab_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["eval", "ppl", "--model", str(lab_model), "--run-dir", str(one), *ARGS]) == 0
    run = two_processes(lab_model, two)
    assert run.returncode == 0, run.stderr[-3000:]
    alone, shared = records(one), records(two)
    assert len(alone) == 2 * 4 and set(shared) == set(alone)  # 2 lengths x (3 methods + sliding window)
    for cell, record in alone.items():
        assert shared[cell]["key"] == record["key"]
        assert shared[cell]["result"] == record["result"]
    assert not (two / "ranks").exists() and (two / "config.json").is_file()
    assert "4/4 [" in run.stderr and "/8 [" not in run.stderr, run.stderr[-3000:]  # each process computed half

    # as if interrupted: two cells only in rank 1's file, the rest already merged
    moved = sorted(shared)[:2]
    (two / "ranks").mkdir()
    (two / "ranks" / "results-00001.jsonl").write_text("".join(json.dumps(shared[c]) + "\n" for c in moved))
    (two / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for c, r in shared.items() if c not in moved))
    run = two_processes(lab_model, two)
    assert run.returncode == 0, run.stderr[-3000:]
    assert records(two) == shared  # same records, same meta: nothing recomputed
    assert not (two / "ranks").exists()


def test_num_processes_refuses_a_command_line_that_is_not_this_command(lab_model, tmp_path, capsys):
    code = cli.main(["eval", "ppl", "--model", str(lab_model), "--run-dir", str(tmp_path / "r"), *ARGS, "--num-processes", "2"])
    assert code == 2 and "relaunches the command line" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_bad_world_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be a positive integer.*'two'"):
        distributed.launched_world()


def test_cells_are_dealt_round_robin_and_ranks_write_their_own_file(monkeypatch, tmp_path):
    from rope_ext.eval.results import ResultStore

    store = ResultStore(tmp_path / "results.jsonl")
    monkeypatch.setattr(distributed, "_active", distributed.Ranks(rank=1, world=3))
    mine, target = distributed.share(list(range(8)), store)
    assert mine == [1, 4, 7] and target.path == tmp_path / "ranks" / "results-00001.jsonl"
    monkeypatch.setattr(distributed, "_active", distributed.Ranks(rank=0, world=3))
    assert distributed.share(list(range(8)), store) == ([0, 3, 6], store)
    with pytest.raises(ValueError, match="needs a run directory"):
        distributed.share([1], ResultStore(None))
