"""The fine-tune end to end on a tiny model: 2-process DDP run, resume, merge, bad input, recipes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from test_longlora_helpers import TRAINED, corpus, tiny_checkpoint

import rope_ext
from rope_ext import cli
from rope_ext.longlora.config import FIELDS, build_config, load_recipe
from rope_ext.longlora.model import load_base, merge_and_save, prepare, rebuild
from rope_ext.longlora.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("longlora")
    return {"model": str(tiny_checkpoint(root / "model")), "data": str(corpus(root / "corpus")), "root": root}


def settings(ws, out, **extra):
    base = dict(model=ws["model"], data=[ws["data"]], output_dir=str(out), target_length=2 * TRAINED, max_steps=4,
                learning_rate=3e-3, warmup_steps=1, lora_rank=4, save_every=2, cache_dir=str(ws["root"] / "cache"))
    return {**base, **extra}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_cpu_run_lowers_the_loss_and_saves_a_model_that_reloads(workspace, tmp_path):
    out = tmp_path / "ddp"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("gamma delta number 7 ends here.\n" * 40)
    argv = ["finetune", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", str(out),
            "--target-length", str(2 * TRAINED), "--max-steps", "6", "--learning-rate", "3e-3", "--warmup-steps", "0",
            "--lora-rank", "4", "--save-every", "3", "--cache-dir", str(workspace["root"] / "cache"), "--num-processes", "2",
            "--evaluate", "--eval-corpus", str(held_out), "--eval-docs", "2"]
    run = subprocess.run([sys.executable, "-m", "rope_ext.cli", *argv], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    evaluated = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(evaluated) == 1 and evaluated[0]["key"]["length"] == 2 * TRAINED and evaluated[0]["result"]["ppl"] > 1
    values = losses(out)
    assert len(values) == 6 and max(values[-2:]) < values[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    saved = {p.name for p in (out / "checkpoints" / "step_00000006").iterdir()}
    assert {"rng_0.safetensors", "rng_1.safetensors", "model.safetensors", "optimizer.json"} <= saved
    assert not [name for name in saved if name.endswith((".pkl", ".bin", ".pt", ".pth"))]
    model, tok = rope_ext.load(out / "model")
    handle = rope_ext.current(model)
    assert handle.name == "pi" and handle.method.factor == 2.0
    plain = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    ids = tok("alpha beta number 12 ends here. " * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-5)


def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(workspace, tmp_path):
    common = dict(lora_dropout=0.2, grad_accum=2, lr_scheduler="linear", merge=False)
    assert train(build_config(settings(workspace, tmp_path / "whole", **common))) is None
    interrupted = tmp_path / "interrupted"
    train(build_config(settings(workspace, interrupted, stop_after=3, **common)))
    assert len(losses(interrupted)) == 3
    # as if killed while saving step 3: only the step-2 checkpoint survives, step 3 is redone
    (interrupted / "checkpoints" / "step_00000003" / "complete.json").unlink()
    train(build_config(settings(workspace, interrupted, resume=True, **common)))
    assert losses(interrupted) == losses(tmp_path / "whole")


def test_merged_checkpoint_computes_what_the_adapted_model_did(workspace, tmp_path):
    config = build_config(settings(workspace, tmp_path / "unused", method="yarn"))
    model = prepare(config, load_base(config)[0])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "embed" in name):
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 250, (1, 2 * TRAINED))
    with torch.no_grad():
        expected = model.eval()(ids).logits
    trained, tokenizer = rebuild(config, model.state_dict())
    merge_and_save(trained, tokenizer, tmp_path / "merged")
    merged, _ = rope_ext.load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    assert rope_ext.current(merged).name == "yarn" and not any("lora" in n for n, _ in merged.named_parameters())


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    ({"data": ["/nonexistent/corpus"]}, "data not found: /nonexistent/corpus"),
    ({"target_length": TRAINED // 2}, "below the model's trained length 32"),
    ({"lora_targets": ["q_projj"]}, "'q_projj' matches no linear layer.*q_proj"),
    ({"trainable": ["embedz"]}, "'embedz' occurs in no parameter name"),
    ({"method": "rerope"}, "changes attention"),
    ({"method_params": {"beta_fast": 3.0}}, "unknown parameter.*beta_fast"),
    ({"resume": True}, "no complete checkpoint"),
])
def test_bad_input_fails_clearly_before_anything_is_written(workspace, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings(workspace, out, **change)))
    code, err = run_cli(["finetune", "--recipe", str(recipe)], capsys)
    assert code == 2 and re.search(message, err), err
    assert not out.exists()


def test_recipe_keys_and_resume_settings_are_checked(workspace, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**settings(workspace, tmp_path / "o"), "learning_rte": 1e-3}))
    code, err = run_cli(["finetune", "--recipe", str(recipe)], capsys)
    assert code == 2 and "unknown key(s) learning_rte" in err and "allowed keys: model, data" in err
    out = tmp_path / "run"
    train(build_config(settings(workspace, out, max_steps=2, merge=False)))
    with pytest.raises(ValueError, match="pass --resume"):
        train(build_config(settings(workspace, out, max_steps=2)))
    with pytest.raises(ValueError, match=r"learning_rate: 0.003 -> 0.001"):
        train(build_config(settings(workspace, out, max_steps=3, learning_rate=1e-3, resume=True)))


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: [d]\noutput_dir: o\ntarget_length: 64\nlearning_rate: 2e-5\nlora_targets: [q_proj]\n")
    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "--recipe", str(recipe), "--target-length", "128", "--no-s2-attn",
                              "--lora-targets", "q_proj", "v_proj", "--method", "yarn", "--method-param", "beta_fast=16"])
    from rope_ext.longlora.config import config_from_args

    config = config_from_args(args)
    assert (config.target_length, config.s2_attn, config.lora_targets) == (128, False, ("q_proj", "v_proj"))
    assert config.learning_rate == 2e-5 and config.method_params == {"beta_fast": 16} and config.data == ("d",)
    with pytest.raises(ValueError, match="missing required setting.*target_length"):
        build_config({"model": "m", "data": ["d"], "output_dir": "o"})


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    values = load_recipe(recipe)
    config = build_config(values)
    assert set(values) <= set(FIELDS)
    assert rope_ext.methods.get(config.method).kind == "frequency"
