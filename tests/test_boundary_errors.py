"""Bad input at the remaining boundaries is a clear error naming what is wrong and what is allowed,
never a traceback from deep inside: load's dtype, a saved config's rope_ext block of the wrong shape,
recipe values of the wrong type or range, fine-tune flags (NaN / inf / zero), and the API's model
argument."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_longlora_helpers import tiny_checkpoint

import rope_ext
from rope_ext.cli import main
from rope_ext.longlora.config import build_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("dtype", ["fp16", "int8", torch.int64, 16, None])
def test_load_refuses_a_dtype_it_cannot_use(model_dir, dtype):
    with pytest.raises(ValueError, match=r"dtype must be a torch floating dtype or one of float32, float16, bfloat16, got"):
        rope_ext.load(model_dir, dtype=dtype, tokenizer=False)


def test_load_takes_a_dtype_by_name(model_dir):
    model, _ = rope_ext.load(model_dir, dtype="bfloat16", tokenizer=False)
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("block,message", [
    (["pi"], r"rope_ext block must be an object with a method name"),
    ({"params": {}}, r"rope_ext block must be an object with a method name"),
    ({"method": "pi", "params": [2.0]}, r"params must be an object of parameter names to values"),
    ({"method": "pi", "params": {"factor": 2.0}, "original_rope_parameters": "x"}, r"original_rope_parameters must be an object"),
    ({"method": "nosuch", "params": {}}, r"unknown method 'nosuch'"),
    ({"method": "pi", "params": {"factor": "2"}}, r"pi: factor must be int or float, got str"),
])
def test_a_saved_rope_ext_block_of_the_wrong_shape_is_named(model_dir, tmp_path, block, message):
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "rope_ext": block}))
    with pytest.raises((ValueError, TypeError), match=message):
        rope_ext.load(path, tokenizer=False)
    assert rope_ext.load(path, tokenizer=False, apply_rope_ext=False)[0] is not None


@pytest.mark.parametrize("field,value,error,message", [
    ("max_steps", "ten", TypeError, "max_steps must be int, got str"),
    ("max_steps", 0, ValueError, "max_steps must be an integer >= 1, got 0"),
    ("learning_rate", "fast", ValueError, "learning_rate must be a number, got 'fast'"),
    ("learning_rate", float("inf"), ValueError, "learning_rate must be finite"),
    ("learning_rate", 0, ValueError, "learning_rate must be > 0"),
    ("lora_dropout", 1.0, ValueError, "lora_dropout must be < 1"),
    ("seed", -1, ValueError, "seed must be an integer >= 0"),
    ("group_size_ratio", float("nan"), ValueError, "group_size_ratio must be finite"),
    ("save_every", True, TypeError, "save_every must be int, got bool"),
])
def test_recipe_values_of_the_wrong_type_or_range_are_named(field, value, error, message):
    recipe = {"model": "m", "data": ["d"], "output_dir": "o", "target_length": 64, field: value}
    with pytest.raises(error, match=message):
        build_config(recipe)


@pytest.mark.parametrize("flag,value", [("--learning-rate", "inf"), ("--learning-rate", "nan"), ("--max-steps", "0"),
                                        ("--lora-dropout", "1"), ("--seed", "-1"), ("--target-length", "1e3")])
def test_finetune_flags_are_one_error_line_and_exit_2(flag, value, capsys):
    assert main(["finetune", "--model", "m", "--data", "d", "--output-dir", "o", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {flag}" in err[0]


@pytest.mark.parametrize("model", [None, "llama", torch.nn.Module(), torch.nn.Linear(2, 2)])
def test_the_api_names_a_model_that_is_not_a_transformers_model(model):
    for call in (lambda: rope_ext.patch(model, "pi", factor=2.0), lambda: rope_ext.unpatch(model), lambda: rope_ext.current(model)):
        with pytest.raises(TypeError, match=r"model must be a transformers PreTrainedModel \(e.g. from rope_ext.load\), got"):
            call()


@pytest.mark.parametrize("name,params,message", [
    ("pi", {"target_length": 16}, r"pi: target_length=16 is below what it can scale to: trained length 32 x factor >= 1; "
                                  r"give target_length >= 32"),
    ("yarn", {"factor": 2.0, "attention_factor": 1e6}, r"yarn: attention_factor must be <= 4, got 1e\+06"),
    ("ntk", {"factor": 3e-4}, r"ntk: factor=0.0003 turns the base 10000 into .*; the base must stay in \(1, 1e\+12\]"),
    ("ntk", {"factor": 1e30}, r"ntk: factor must be <= 4096, got 1e\+30"),
    ("pi", {"factor": 2.0, "target_length": 2**40}, r"pi: target_length must be an integer <= 16777216"),
])
def test_values_once_silently_replaced_or_overflowing_are_refused(name, params, message):
    from conftest import make_tiny
    from registry_suite import assert_same, snapshot

    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        rope_ext.patch(model, name, **params)
    assert_same(before, snapshot(model))


def test_unbounded_work_is_refused_up_front(capsys):
    """`calc bound --lengths 1e12` once ran for hours (ETA 358,882 h): lengths stop at 16M tokens."""
    assert main(["calc", "bound", "--lengths", "1000000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lengths must be at most 16777216 tokens" in err[0]
