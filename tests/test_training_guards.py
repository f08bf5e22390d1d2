"""Training stops with a clear error when the loss becomes non-finite, instead of saving NaN weights
and exiting 0; bad training values are refused before any step."""
from __future__ import annotations

import itertools

import pytest
import torch

from rope_ext.cli import main
from rope_ext.eval.lab import LabConfig, train_loop


def test_a_non_finite_loss_stops_the_lab_training_loop_naming_the_step():
    model = torch.nn.Linear(4, 1)
    losses = iter([1.0, 0.9, float("nan"), 0.5])

    def loss_fn(m, batch):
        return m(batch).sum() * 0 + next(losses)

    batches = itertools.repeat(torch.ones(2, 4))
    with pytest.raises(FloatingPointError, match=r"toy: the loss became nan at step 3 of 4 .*lower the learning rate"):
        train_loop(model, batches, loss_fn, steps=4, lr=1e-3, warmup=0, weight_decay=0.0, desc="toy")


@pytest.mark.parametrize("field,value,message", [
    ("lr", float("inf"), "lr must be finite"), ("lr", 0.0, "lr must be > 0"), ("steps", 0, "steps must be an integer >= 1"),
    ("rope_theta", float("inf"), "rope_theta must be finite"), ("max_bias", 1e9, "max_bias must be <= 64"),
])
def test_lab_config_refuses_values_it_would_have_replaced_or_trained_to_nan(field, value, message):
    with pytest.raises(ValueError, match=message):
        LabConfig(**{field: value})


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--lr", "inf"], ["--lr", "0"], ["--rope-theta", "inf"]])
def test_pretrain_flags_are_refused_before_anything_is_written(tmp_path, flags, capsys):
    out = tmp_path / "out"
    assert main(["pretrain", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {flags[0]}" in err[0]
    assert not out.exists()


def test_a_non_finite_fine_tune_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    """The 5th forward returns a NaN loss: training stops before that step's update, saves the state
    after step 4 (save_every=3 had saved only step 3) and names it; its weights are finite."""
    from safetensors.torch import load_file
    from test_longlora_helpers import TRAINED, corpus, tiny_checkpoint
    from transformers import LlamaForCausalLM

    from rope_ext.longlora import checkpoint as ckpt
    from rope_ext.longlora.config import build_config
    from rope_ext.longlora.train import train

    forward, calls = LlamaForCausalLM.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 5 and self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    out = tmp_path / "run"
    config = build_config(dict(model=str(tiny_checkpoint(tmp_path / "model")), data=[str(corpus(tmp_path / "corpus"))],
                               output_dir=str(out), target_length=2 * TRAINED, max_steps=8, save_every=3, lora_rank=4,
                               warmup_steps=1, merge=False, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(FloatingPointError, match=r"loss became non-finite \(nan\) at step 5; training stopped, the last good "
                                                 r"state is .*step_0+4 \(after step 4\): lower --learning-rate"):
        train(config)
    assert [step for step, _ in ckpt.complete_checkpoints(out)] == [3, 4]
    weights = load_file(ckpt.checkpoint_path(out, 4) / ckpt.WEIGHTS)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
