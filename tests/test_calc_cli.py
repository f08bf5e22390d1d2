"""`rope-ext calc`: JSON output parses and agrees with the library, the table and plot are written,
and bad input exits with code 2 and a message naming the value."""
from __future__ import annotations

import json

import pytest
import transformers

from rope_ext import calc
from rope_ext.cli import main
from rope_ext.models import load_config


def run_json(capsys, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek")
    transformers.DeepseekV3Config(num_hidden_layers=4).save_pretrained(path)
    return path


def test_bound_json_and_plot(capsys, tmp_path):
    png = tmp_path / "bound.png"
    records = run_json(capsys, "calc", "bound", "--lengths", "1k,4096", "--head-dim", "128", "--per-decade", "50", "--plot", str(png))
    assert [r["length"] for r in records] == [1024, 4096]
    assert records[1]["published_men_et_al_2024"] == calc.PUBLISHED_BOUNDS_D128[4096]
    assert 1e4 < records[1]["first_feasible_base"] <= records[1]["stable_base"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bound_table(capsys):
    assert main(["calc", "bound", "--lengths", "2048", "--head-dim", "64", "--per-decade", "20"]) == 0
    out = capsys.readouterr().out
    assert "first feasible" in out and "2048" in out


@pytest.mark.slow
def test_model_smollm2_json(capsys):
    info = run_json(capsys, "calc", "model", "smollm2", "--target-length", "32k")
    assert (info["trained_length"], info["target_length"], info["rotary_dim"]) == (8192, 32768, 64)
    assert info["critical_dim"] == calc.critical_dimension(64, info["rope_theta"], 8192)
    recs = {r["method"]: r for r in info["recommendations"]}
    assert recs["yarn"]["params"]["factor"] == 4.0
    shape = calc.attention_shape(load_config("smollm2"))
    assert [b["kv_bytes"] for b in info["budget"]] == [calc.kv_cache_bytes(shape, n) for n in (8192, 32768)]
    assert info["budget"][0]["kv_bytes"] == 2 * 30 * 3 * 64 * 8192 * 2


def test_model_table_with_method_filter(capsys):
    assert main(["calc", "model", "smollm2", "--target-length", "16384", "--method", "yarn,rerope"]) == 0
    out = capsys.readouterr().out
    assert "yarn" in out and "rerope" in out and "llama3" not in out and "critical dimension" in out


def test_kv_mla_json(capsys, deepseek_dir):
    data = run_json(capsys, "calc", "kv", str(deepseek_dir), "--lengths", "4k,128k", "--batch-size", "2", "--dtype", "fp8")
    assert data["attention"]["kind"] == "MLA"
    assert [r["kv_bytes"] for r in data["budget"]] == [2 * 4 * (512 + 64) * n * 1 for n in (4096, 131072)]


def test_model_on_unsupported_family_still_reports(capsys, deepseek_dir):
    info = run_json(capsys, "calc", "model", str(deepseek_dir), "--target-length", "16k")
    assert info["family"] is None and "deepseek" in info["patch_support"].lower()
    assert info["rotary_dim"] == 64 and info["attention"]["kind"] == "MLA"


@pytest.mark.parametrize("argv, text", [
    (["calc", "bound", "--lengths", "0"], "'0'"),
    (["calc", "bound", "--lengths", "4k,abc"], "'abc'"),
    (["calc", "bound", "--lengths", "4096", "--head-dim", "127"], "127"),
    (["calc", "bound", "--lengths", "4096", "--plot", "out.jpg"], "out.jpg"),
    (["calc", "bound", "--lengths", "4096", "--plot", "/no/such/dir/b.png"], "/no/such/dir"),
    (["calc", "model", "smollm2", "--target-length", "32k", "--method", "warp"], "'warp'"),
    (["calc", "model", "/no/such/model", "--target-length", "32k"], "/no/such/model"),
    (["calc", "model", "smollm2", "--target-length", "0"], "'0'"),
    (["calc", "kv", "smollm2", "--dtype", "float13"], "float13"),
    (["calc", "kv", "smollm2", "--batch-size", "0"], "0"),
])
def test_bad_input_exits_2_naming_the_value(capsys, argv, text):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and text in err


def test_missing_subcommand_is_a_usage_error(capsys):
    assert main(["calc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rope-ext calc: error: the following arguments are required: WHAT" in err[0]
