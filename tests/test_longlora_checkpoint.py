"""Fine-tune checkpoints as safetensors + JSON: exact round trips, bitwise resume, atomic saves,
damaged files named, and nothing changed by a load that fails."""
from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_longlora_helpers import TRAINED, corpus, tiny_checkpoint

from rope_ext.longlora import checkpoint as ckpt
from rope_ext.longlora.config import build_config
from rope_ext.longlora.train import train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"model": str(tiny_checkpoint(root / "model")), "data": str(corpus(root / "corpus")), "root": root}


def settings(ws, out: Path, **extra):
    base = dict(model=ws["model"], data=[ws["data"]], output_dir=str(out), target_length=2 * TRAINED, max_steps=4,
                learning_rate=3e-3, warmup_steps=1, lora_rank=4, save_every=2, cache_dir=str(ws["root"] / "cache"),
                lora_dropout=0.2, grad_accum=2, lr_scheduler="linear", merge=False)
    return {**base, **extra}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def interrupted_and_resumed(ws, out: Path, **extra) -> None:
    """Stop after step 3, lose step 3's checkpoint (as if killed while saving it), resume."""
    train(build_config(settings(ws, out, stop_after=3, **extra)))
    (out / "checkpoints" / "step_00000003" / ckpt.MARKER).unlink()
    train(build_config(settings(ws, out, resume=True, **extra)))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def assert_same_state(a, b) -> None:
    """Nested states equal, tensors bitwise."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    else:
        assert a == b


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_reproduces_losses_weights_and_optimizer_bitwise(workspace, tmp_path, lora):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(build_config(settings(workspace, whole, lora=lora)))
    interrupted_and_resumed(workspace, resumed, lora=lora)
    assert losses(resumed) == losses(whole)
    final_whole, final_resumed = ckpt.checkpoint_path(whole, 4), ckpt.checkpoint_path(resumed, 4)
    assert_same_tensors(load_file(final_whole / ckpt.WEIGHTS), load_file(final_resumed / ckpt.WEIGHTS))
    assert_same_tensors(load_file(final_whole / "optimizer.safetensors"), load_file(final_resumed / "optimizer.safetensors"))
    for name in ("optimizer.json", "scheduler.json", "training.json", "rng_0.json"):
        assert (final_whole / name).read_text() == (final_resumed / name).read_text(), name


def test_resume_without_the_rng_states_would_diverge(workspace, tmp_path, monkeypatch):
    """The bitwise test above can fail: with dropout, skipping the RNG restore changes the losses."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(build_config(settings(workspace, whole)))
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    interrupted_and_resumed(workspace, resumed)
    assert losses(resumed)[:2] == losses(whole)[:2] and losses(resumed)[2:] != losses(whole)[2:]


def test_checkpoint_holds_only_safetensors_and_json(workspace, tmp_path):
    out = tmp_path / "run"
    train(build_config(settings(workspace, out, max_steps=2)))
    (path,) = [p for _, p in ckpt.complete_checkpoints(out)]
    assert sorted(p.name for p in path.iterdir()) == [
        "complete.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_0.json", "rng_0.safetensors",
        "scheduler.json", "training.json"]
    assert json.loads((path / ckpt.MARKER).read_text()) == {"step": 2, "format": ckpt.FORMAT}
    assert not list((out / "checkpoints").glob(".*"))


def test_state_round_trip_keeps_values_and_types(tmp_path):
    value = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, dtype=torch.bfloat16)}},
             "groups": [{"betas": (0.9, 0.999), "params": [0], "fused": None, "amsgrad": False}],
             "python": (3, tuple(range(625)), None), "big": 2**62, "floats": [math.inf, -0.0, 1e-300, 0.1],
             "odd keys": {"__tensor__": 1, (1, 2): "tuple key"}}
    ckpt.write_state(tmp_path / "s", value)
    back = ckpt.read_state(tmp_path / "s")
    assert back["state"][0]["exp_avg"].dtype == torch.bfloat16 and torch.equal(back["state"][0]["exp_avg"], value["state"][0]["exp_avg"])
    assert torch.equal(back["state"][0]["step"], value["state"][0]["step"]) and back["state"][0]["step"].dim() == 0
    del back["state"], value["state"]
    assert back == value
    assert type(back["groups"][0]["betas"]) is tuple and type(back["python"][1]) is tuple
    assert math.copysign(1, back["floats"][1]) == -1


def test_state_that_json_cannot_hold_is_refused_naming_the_key(tmp_path):
    with pytest.raises(TypeError, match=r"s\.groups: a set cannot be stored"):
        ckpt.write_state(tmp_path / "s", {"groups": {1, 2}})
    assert not list(tmp_path.iterdir())


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.write_state(tmp_path / "rng", ckpt.rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.read_state(tmp_path / "rng"))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


class Parts:
    """A tiny model, its AdamW and LambdaLR, prepared by accelerate. The first layer is frozen (the
    same for every seed, as a base model is); the trainable one starts from ``seed``."""

    def __init__(self, seed: int):
        from accelerate import Accelerator
        from transformers import get_scheduler

        self.accelerator = Accelerator()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        model[0].requires_grad_(False)
        torch.manual_seed(seed)
        model[1].reset_parameters()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        self.scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def step(self) -> None:
        self.model(torch.randn(3, 4)).square().sum().backward()
        self.optimizer.step(), self.scheduler.step(), self.optimizer.zero_grad()

    def save(self, path: Path, step: int) -> None:
        ckpt.save_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, path, step)

    def load(self, path: Path) -> None:
        ckpt.load_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, path)

    def snapshot(self) -> dict:
        return {"weights": {k: v.clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "step": self.accelerator.step}


def saved_checkpoint(tmp_path: Path) -> Path:
    parts = Parts(seed=0)
    parts.step(), parts.step()
    path = tmp_path / "checkpoints" / "step_00000002"
    parts.save(path, 2)
    return path


def test_load_restores_the_saved_state(tmp_path):
    parts = Parts(seed=0)
    parts.step(), parts.step()
    path = tmp_path / "checkpoints" / "step_00000002"
    parts.save(path, 2)
    parts.step()
    expected = parts.snapshot()
    other = Parts(seed=5)
    other.load(path)
    other.step()
    assert_same_state(other.snapshot(), expected)


@pytest.mark.parametrize("damage,error,message", [
    (lambda p: (p / "rng_0.json").write_text("{not json"), ValueError, r"rng_0\.json is damaged"),
    (lambda p: (p / "rng_0.json").write_text('{"format": 1, "state": {"python": 1}}'), ValueError, r"rng_0\.json holds no valid RNG"),
    (lambda p: (p / "optimizer.safetensors").write_bytes(b"\x00" * 7), ValueError, r"optimizer\.safetensors is not a readable"),
    (lambda p: (p / "scheduler.json").unlink(), FileNotFoundError, r"scheduler\.json is missing"),
    (lambda p: (p / "training.json").write_text('{"format": 1, "state": {"accelerator_step": -1}}'), ValueError,
     r"training\.json: accelerator_step must be"),
    (lambda p: (p / ckpt.MARKER).write_text('{"step": 2}'), ValueError, r"format None, this rope-ext reads format 1"),
])
def test_a_damaged_checkpoint_is_named_and_changes_nothing(tmp_path, damage, error, message):
    path = saved_checkpoint(tmp_path)
    damage(path)
    parts = Parts(seed=7)
    before = parts.snapshot()
    with pytest.raises(error, match=message):
        parts.load(path)
    assert_same_state(parts.snapshot(), before)


def test_weights_of_another_model_are_refused_before_loading(tmp_path):
    path = saved_checkpoint(tmp_path)
    weights = load_file(path / ckpt.WEIGHTS)
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in weights.items()}, str(path / ckpt.WEIGHTS))
    parts = Parts(seed=7)
    before = parts.snapshot()
    with pytest.raises(ValueError, match=r"model\.safetensors: 1\.(weight|bias) is torch.float32 \(3,.*this run's is torch.float32 \(2,"):
        parts.load(path)
    assert_same_state(parts.snapshot(), before)


def test_an_interrupted_save_leaves_no_checkpoint_that_resume_would_take(tmp_path, monkeypatch):
    parts = Parts(seed=0)
    parts.step()
    parts.save(tmp_path / "checkpoints" / "step_00000001", 1)
    parts.step()
    real = ckpt._write_text

    def crash_at_the_marker(path: Path, text: str) -> None:
        if path.name == ckpt.MARKER:
            raise KeyboardInterrupt("killed while saving")
        real(path, text)

    monkeypatch.setattr(ckpt, "_write_text", crash_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        parts.save(tmp_path / "checkpoints" / "step_00000002", 2)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert (tmp_path / "checkpoints" / ".step_00000002.partial" / "rng_0.json").is_file()
    parts.save(tmp_path / "checkpoints" / "step_00000003", 3)
    ckpt.prune(tmp_path, keep=5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000003"]


def test_a_save_replaces_an_unfinished_checkpoint_of_the_same_step(tmp_path):
    stale = tmp_path / "checkpoints" / "step_00000002"
    stale.mkdir(parents=True)
    (stale / "leftover.txt").write_text("from a killed save")
    parts = Parts(seed=0)
    parts.step()
    parts.save(stale, 2)
    assert not (stale / "leftover.txt").exists() and (stale / ckpt.MARKER).is_file()


def test_a_damaged_marker_is_named(tmp_path):
    path = saved_checkpoint(tmp_path)
    (path / ckpt.MARKER).write_text("[")
    with pytest.raises(ValueError, match=r"marker .*complete\.json is damaged"):
        ckpt.complete_checkpoints(tmp_path)


@pytest.mark.slow
def test_two_process_resume_reproduces_the_uninterrupted_run(workspace, tmp_path):
    """DDP over gloo: every rank saves and restores its own RNG states (rng_0, rng_1)."""
    def finetune(out: Path, *extra: str) -> None:
        argv = ["finetune", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", str(out),
                "--target-length", str(2 * TRAINED), "--max-steps", "4", "--learning-rate", "3e-3", "--warmup-steps", "1",
                "--lora-rank", "4", "--lora-dropout", "0.2", "--save-every", "2", "--no-merge",
                "--cache-dir", str(workspace["root"] / "cache"), "--num-processes", "2", *extra]
        run = subprocess.run([sys.executable, "-m", "rope_ext.cli", *argv], capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finetune(whole)
    finetune(resumed, "--stop-after", "2")
    assert {p.name for p in ckpt.checkpoint_path(resumed, 2).iterdir()} >= {"rng_0.json", "rng_1.json"}
    finetune(resumed, "--resume")
    assert losses(resumed) == losses(whole)
    assert_same_tensors(load_file(ckpt.checkpoint_path(whole, 4) / ckpt.WEIGHTS),
                        load_file(ckpt.checkpoint_path(resumed, 4) / ckpt.WEIGHTS))
