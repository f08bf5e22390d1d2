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
