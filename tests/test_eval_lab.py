"""The lab: tiny pretraining runs, checkpoints that reload with their position encoding."""
from __future__ import annotations

import json

import pytest
from conftest import TINY_LAB
import torch
from rope_ext.eval.lab import (
    LabConfig,
    build_model,
    is_complete,
    load_lab,
    lr_at,
    pretrain,
    save_lab,
)
from rope_ext.eval.lab_passkey import PasskeyLabConfig, finetune_passkey
from rope_ext.eval.tokens import byte_tokenizer

import rope_ext
from rope_ext import cli



def test_pretrain_saves_a_normal_checkpoint(lab_lm):
    assert is_complete(lab_lm) and (lab_lm / "model.safetensors").is_file()
    config = json.loads((lab_lm / "config.json").read_text())
    assert config["max_position_embeddings"] == 16
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    record = json.loads((lab_lm / "lab.json").read_text())
    assert record["trained_length"] == 16 and len(record["loss_curve"]) == 3
    model, tok = load_lab(lab_lm)
    assert type(model).__name__ == "LlamaForCausalLM" and rope_ext.current(model) is None
    assert tok("ab", add_special_tokens=False)["input_ids"] == [100, 101]


def test_training_lowers_the_loss(tmp_path, text_corpus):
    path = pretrain(LabConfig(**{**TINY_LAB, "steps": 30, "lr": 1e-2}, corpus=text_corpus), tmp_path / "lm")
    curve = json.loads((path / "lab.json").read_text())["loss_curve"]
    assert sum(curve[-5:]) / 5 < curve[0] - 1.0


@pytest.mark.parametrize("position", ["alibi", "nope"])
def test_alibi_and_nope_reload_with_their_position_encoding(tmp_path, position):
    cfg = LabConfig(**{**TINY_LAB, "position": position, "max_bias": 4.0})
    model = build_model(cfg, 259).eval()
    assert rope_ext.current(model).name == position
    save_lab(model, byte_tokenizer(), tmp_path / position, {"kind": "lm"})
    config = json.loads((tmp_path / position / "config.json").read_text())
    assert config["rope_ext"]["method"] == position
    loaded, _ = load_lab(tmp_path / position)
    assert rope_ext.current(loaded).name == position
    x = torch.randint(3, 259, (1, 40))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5)
        rope_ext.unpatch(loaded)
        assert not torch.equal(loaded(x).logits, model(x).logits)


def test_passkey_finetune_from_lab_lm(tmp_path, text_corpus):
    lm = pretrain(LabConfig(**{**TINY_LAB, "context": 64, "steps": 1}, corpus=text_corpus), tmp_path / "lm")
    out = finetune_passkey(lm, PasskeyLabConfig(steps=2, batch=2, corpus=text_corpus), tmp_path / "pk")
    record = json.loads((out / "lab.json").read_text())
    assert record["kind"] == "passkey" and record["trained_length"] == 64 and 0 <= record["train_exact_last20"] <= 1
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 64


def test_lab_config_validation_and_schedule():
    for bad in (dict(position="no_such_encoding"), dict(context=4), dict(hidden=30, heads=4), dict(steps=0)):
        with pytest.raises(ValueError):
            LabConfig(**bad)
    assert LabConfig(seed=1).key() != LabConfig(seed=2).key() and LabConfig().key() == LabConfig().key()
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[9] == 1.0 and all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_cli_pretrain_eval_report_resume(tmp_path, text_corpus, capsys):
    out = tmp_path / "lm"
    args = ["pretrain", "--out", str(out), "--context", "16", "--layers", "1", "--hidden", "32", "--heads", "2",
            "--intermediate", "32", "--steps", "2", "--batch", "2", "--corpus", text_corpus, "--threads", "1"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    run = tmp_path / "run"
    ev = ["eval", "ppl", "--model", str(out), "--run-dir", str(run), "--lengths", "1x,2x", "--methods", "none,yarn,rerope",
          "--method-params", "rerope.window=4", "--corpus", text_corpus, "--threads", "1", "--docs", "1"]
    assert cli.main(ev) == 0
    lines = (run / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert {json.loads(l)["key"]["params"].get("window") for l in lines if '"rerope"' in l} == {4}
    assert (run / "report.md").is_file() and (run / "config.json").is_file() and (run / "env.json").is_file()
    assert json.loads((run / "env.json").read_text())["threads"] == 1
    assert cli.main(ev) == 0
    assert (run / "results.jsonl").read_text().splitlines() == lines
    pk = ["eval", "passkey", "--model", str(out), "--run-dir", str(run), "--lengths", "3x", "--methods", "none",
          "--depths", "0,1", "--trials", "2", "--corpus", text_corpus, "--threads", "1"]
    assert cli.main(pk) == 0
    assert len((run / "results.jsonl").read_text().splitlines()) == 10
    assert cli.main(["report", str(run)]) == 0
    assert list((run / "report").glob("passkey_*.png"))


def test_alibi_model_evaluates_as_loaded_and_refuses_rope_methods():
    from rope_ext.eval.ppl import perplexity

    model = build_model(LabConfig(**{**TINY_LAB, "position": "alibi"}), 259).eval()
    docs = [torch.randint(3, 259, (64,), generator=torch.Generator().manual_seed(0))]
    recs = perplexity(model, docs, ["1x", "4x"], ["none"], progress=False)
    assert len(recs) == 4 and rope_ext.current(model).name == "alibi"
    with pytest.raises(ValueError, match="trained with alibi"):
        perplexity(model, docs, ["4x"], ["yarn"], progress=False)
    assert rope_ext.current(model).name == "alibi"
