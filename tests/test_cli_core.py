"""`rope-ext methods` and `rope-ext info`: what they print is checked against the registry, the
model's own modules and configs, and what ``rope_ext.patch`` accepts."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types

import pytest
import torch
import transformers
from conftest import make_tiny
from rope_ext.patches import family_for

import rope_ext
from rope_ext import cli
from rope_ext.cli import main
from rope_ext.methods import REGISTRY
from rope_ext.patch import model_specs

SAMPLE_PARAMS = {"factor": 2.0, "window": 8, "k": 2.0, "group_size": 2, "segments": (16, 32), "dilations": (1, 2),
                 "init_tokens": 2, "block_size": 4, "representatives": 1, "topk": 2, "lookup_queries": 3, "chunk_size": 8,
                 "local_window": 2}


def run_json(capsys, *argv: str):
    capsys.readouterr()                                     # what the test printed before (e.g. a library's warning while saving)
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_methods_json_lists_every_method_with_its_params(capsys):
    records = run_json(capsys, "methods")
    assert [r["name"] for r in records] == sorted(REGISTRY)
    for record in records:
        cls = REGISTRY[record["name"]]
        assert (record["kind"], record["rotation"]) == (cls.kind, cls.rotation)
        assert record["summary"] and record["reference"]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert [p["name"] for p in record["params"]] == list(fields)
        for p in record["params"]:
            field = fields[p["name"]]
            required = field.default is dataclasses.MISSING
            assert p["required"] == required
            if not required:
                assert p["default"] == field.default


def test_methods_table_shows_every_method_and_required_params(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line and not line.startswith(" ") and line.split()[0] in REGISTRY}
    assert set(rows) == set(REGISTRY)
    assert "window: int (required)" in rows["rerope"]
    header = lines[0]
    for name, row in rows.items():
        assert row.index(REGISTRY[name].kind) == header.index("KIND")
        assert row.index(REGISTRY[name].rotation, header.index("ROTATION")) == header.index("ROTATION")


@pytest.mark.slow
def test_info_smollm2(capsys):
    info = run_json(capsys, "info", "smollm2")
    assert info["family"] == "llama"
    assert info["head_dim"] == 64 and info["rotary_dim"] == 64
    assert info["rope_theta"] == 100000.0
    assert info["trained_length"] == 8192
    assert info["rope_ext"] is None
    by_name = {m["name"]: m for m in info["methods"]}
    assert set(by_name) == set(REGISTRY)
    assert all(m["applies"] for m in info["methods"])
    assert "ALiBi-trained" in by_name["alibi"]["note"]


def test_info_unknown_path_exits_2_naming_it(capsys):
    assert main(["info", "/nonexistent/model-dir"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/model-dir" in err and "not found" in err


def test_info_tiny_saved_model(tmp_path, capsys):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    info = run_json(capsys, "info", str(tmp_path))
    rotary = model.model.rotary_emb
    assert info["family"] == "llama"
    assert info["head_dim"] == 12 == model.model.layers[0].self_attn.head_dim
    assert info["rotary_dim"] == 2 * rotary.inv_freq.numel()
    assert info["rope_theta"] == 5000.0
    assert info["trained_length"] == 96
    assert (info["num_heads"], info["num_kv_heads"]) == (4, 2)
    assert info["rope_parameters"]["rope_theta"] == 5000.0


def test_info_saved_patched_model_reports_original_rope_and_block(tmp_path, capsys):
    model = make_tiny("llama")
    rope_ext.patch(model, "ntk", factor=4.0)
    patched_theta = model.config.rope_parameters["rope_theta"]
    rope_ext.save_pretrained(model, tmp_path)
    info = run_json(capsys, "info", str(tmp_path))
    assert info["rope_theta"] == 10000.0
    assert info["rope_parameters"]["rope_theta"] == pytest.approx(patched_theta)
    assert info["rope_ext"]["method"] == "ntk" and info["rope_ext"]["params"]["factor"] == 4.0
    assert main(["info", str(tmp_path)]) == 0
    assert "ntk(" in capsys.readouterr().out


@pytest.mark.parametrize("model_type", ["falcon", "gemma3_text", "phi3"])
def test_info_method_applicability_matches_what_patch_accepts(model_type, tmp_path, capsys):
    model = make_tiny(model_type)
    model.save_pretrained(tmp_path)
    info = run_json(capsys, "info", str(tmp_path))
    spec = model_specs(model, family_for(model))
    main_spec = spec.get("full_attention") or next(iter(spec.values()))
    assert (info["rotary_dim"], info["rope_theta"]) == (main_spec.rotary_dim, main_spec.rope_theta)
    for row in info["methods"]:
        fields = {f.name for f in dataclasses.fields(REGISTRY[row["name"]])}
        params = {k: v for k, v in SAMPLE_PARAMS.items() if k in fields}
        try:
            rope_ext.patch(model, row["name"], **params)
        except ValueError as err:
            assert not row["applies"], f"{row['name']} marked applicable but patch refused: {err}"
        else:
            rope_ext.unpatch(model)
            assert row["applies"], f"{row['name']} marked not applicable but patch accepted it"


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_command_module_adds_exactly_one_subcommand(name):
    module = importlib.import_module(f"rope_ext.commands.{name}")
    sub = argparse.ArgumentParser().add_subparsers()
    module.add_parser(sub)
    assert list(sub.choices) == [name.replace("_", "-")]
    assert callable(module.run)


def test_build_parser_registers_every_command():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [name.replace("_", "-") for name in cli.COMMANDS]


def broken_commands(monkeypatch, how: str) -> str:
    """Add a subcommand whose module is missing, raises while importing, or lacks add_parser."""
    name = "broken_cmd"
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, name))
    module_name = f"rope_ext.commands.{name}"
    if how == "raises":
        real = importlib.import_module

        def import_module(target, *args, **kwargs):
            if target == module_name:
                raise RuntimeError("boom at import")
            return real(target, *args, **kwargs)

        monkeypatch.setattr(cli.importlib, "import_module", import_module)
    elif how == "no_add_parser":
        monkeypatch.setitem(sys.modules, module_name, types.ModuleType(module_name))
    return name


@pytest.mark.parametrize("how,cause", [
    ("missing", "No module named 'rope_ext.commands.broken_cmd'"),
    ("raises", "RuntimeError: boom at import"),
    ("no_add_parser", "has no add_parser"),
])
def test_a_broken_subcommand_module_fails_loudly_naming_it(monkeypatch, capsys, how, cause):
    name = broken_commands(monkeypatch, how)
    with pytest.raises(ImportError, match=f"subcommand '{name}'") as info:
        cli.build_parser()
    assert cause in str(info.value)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{name}'" in err and cause in err
