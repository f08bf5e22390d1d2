"""The one length syntax (``rope_ext.lengths``): every accepted form, every refused form with an
error naming the value, properties against plain arithmetic, and the commands that use it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from hypothesis import assume, given
from hypothesis import strategies as st
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.tokens import byte_tokenizer
from rope_ext.lengths import MAX_LENGTH, parse_length, parse_lengths
from rope_ext.models import load_config

import rope_ext
from rope_ext import calc
from rope_ext.cli import main

T = 4096
ACCEPTED = [
    (2048, 2048), (np.int64(2048), 2048), (2048.0, 2048), ("32768", 32768), (" 32768 ", 32768),
    ("32k", 32768), ("32K", 32768), ("32 k", 32768), ("1.5k", 1536), (".5k", 512), ("1M", 1 << 20),
    ("1m", 1 << 20), ("0.5M", 1 << 19), ("16M", MAX_LENGTH), (str(MAX_LENGTH), MAX_LENGTH),
    ("4x", 4 * T), ("4X", 4 * T), ("1.5x", 6144), ("0.25x", 1024), (" 2 x ", 2 * T),
]
REFUSED = [
    (True, "True"), (False, "False"), (1.5, "1.5"), (math.inf, "inf"), (math.nan, "nan"), (None, "None"),
    ("", "''"), ("   ", "'   '"), ("0", "'0'"), ("-3", "'-3'"), ("abc", "'abc'"), ("2y", "'2y'"), ("1.5", "'1.5'"),
    ("0.1k", "'0.1k'"), ("inf", "'inf'"), ("nan", "'nan'"), ("1e3", "'1e3'"), ("0x", "'0x'"), ("4xx", "'4xx'"),
    ("32k4", "'32k4'"), (str(MAX_LENGTH + 1), f"'{MAX_LENGTH + 1}'"), ("17M", "'17M'"), ("5000x", "'5000x'"),
    (0, "0"), (-5, "-5"), (MAX_LENGTH + 1, str(MAX_LENGTH + 1)),
]


@pytest.mark.parametrize("text, tokens", ACCEPTED)
def test_parse_length_accepts(text, tokens):
    assert parse_length(text, T) == tokens
    assert type(parse_length(text, T)) is int


@pytest.mark.parametrize("text, tokens", ACCEPTED)
def test_parse_lengths_accepts_each_form(text, tokens):
    assert parse_lengths([text], T) == [tokens]
    if isinstance(text, str):
        assert parse_lengths(f"{text},1k", T) == list(dict.fromkeys([tokens, 1024]))


@pytest.mark.parametrize("text, shown", REFUSED)
def test_parse_length_refuses_naming_the_value(text, shown):
    with pytest.raises(ValueError) as err:
        parse_length(text, T, "--target-length")
    assert shown in str(err.value) and "--target-length" in str(err.value)


@pytest.mark.parametrize("text, shown", REFUSED)
def test_parse_lengths_refuses_naming_the_value(text, shown):
    with pytest.raises(ValueError) as err:
        parse_lengths([1024, text], T)
    assert shown in str(err.value) and "--lengths" in str(err.value)


def test_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"^length must be tokens \(32768\), k = 1024 tokens \(32k\).*got 'abc'") as err:
        parse_length("abc")
    assert "4x" in str(err.value)
    with pytest.raises(ValueError, match=f"at most {MAX_LENGTH}"):
        parse_length("17M")
    with pytest.raises(ValueError, match="whole number of tokens"):
        parse_length(2.5)


def test_multiple_of_trained_length_needs_one():
    for call in (lambda: parse_length("4x"), lambda: parse_lengths("1k,4x")):
        with pytest.raises(ValueError, match="lengths? '4x' is a multiple of a model's trained length") as err:
            call()
        assert "'4x'" in str(err.value)
    assert parse_lengths("1k,32k,1M") == [1024, 32768, 1 << 20]


def test_order_kept_duplicates_dropped():
    assert parse_lengths("32k,1x,32768,8192,1k", 8192) == [32768, 8192, 1024]
    assert parse_lengths(["2x", 1024, "1k", 4096.0], 2048) == [4096, 1024]
    assert parse_lengths(2048) == [2048]
    assert parse_lengths(" 4k , , 8k ") == [4096, 8192]


@pytest.mark.parametrize("empty", ["", ",", " , ", []])
def test_no_lengths_is_an_error(empty):
    with pytest.raises(ValueError, match="--lengths must list at least one length"):
        parse_lengths(empty)


def test_minimum():
    assert parse_length("1") == 1
    assert parse_lengths("2,3", minimum=2) == [2, 3]
    with pytest.raises(ValueError, match="at least 2 tokens, got '1'"):
        parse_lengths("2,1", minimum=2)


@given(st.integers(1, MAX_LENGTH))
def test_tokens_roundtrip(n):
    assert parse_length(str(n)) == n
    assert parse_length(n) == n


@given(st.integers(1, MAX_LENGTH // 1024))
def test_k_is_1024(k):
    assert parse_length(f"{k}k") == parse_length(f"{k}K") == 1024 * k


@given(st.integers(1, MAX_LENGTH >> 20))
def test_m_is_2_to_the_20(m):
    assert parse_length(f"{m}M") == m << 20


@given(st.floats(0.01, 64.0), st.integers(8, 262144))
def test_multiple_of_trained_length(m, trained):
    expected = round(m * trained)
    assume(1 <= expected <= MAX_LENGTH)
    assert parse_length(f"{m}x", trained) == expected


@given(st.lists(st.integers(1, 1 << 20), min_size=1, max_size=8))
def test_parse_lengths_is_ordered_dedup(values):
    assert parse_lengths(",".join(map(str, values))) == list(dict.fromkeys(values))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=1024).save_pretrained(path)
    return path


def run_json(capsys, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_calc_model_target_length_4x(capsys, llama_dir):
    info = run_json(capsys, "calc", "model", str(llama_dir), "--target-length", "4x")
    assert (info["trained_length"], info["target_length"]) == (1024, 4096)
    assert [b["length"] for b in info["budget"]] == [1024, 4096]


def test_calc_kv_lengths_relative_to_the_model(capsys, llama_dir):
    data = run_json(capsys, "calc", "kv", str(llama_dir), "--lengths", "2x,1k,16384")
    assert [r["length"] for r in data["budget"]] == [2048, 1024, 16384]


def test_bound_command_refuses_4x_without_a_model(capsys):
    assert main(["calc", "bound", "--lengths", "1k,4x"]) == 2
    err = capsys.readouterr().err
    assert "'4x'" in err and "trained length" in err and "--lengths" in err


def test_calc_model_error_names_the_flag(capsys, llama_dir):
    assert main(["calc", "model", str(llama_dir), "--target-length", "4q"]) == 2
    err = capsys.readouterr().err
    assert "--target-length" in err and "'4q'" in err


def test_calc_api_takes_the_syntax(llama_dir):
    assert calc.base_lower_bound("1k", 64, per_decade=10).length == 1024
    assert calc.kv_cache_bytes(calc.attention_shape(load_config(str(llama_dir))), "1k") == 2 * 2 * 2 * 16 * 1024 * 2
    assert calc.analyze_model(load_config(str(llama_dir)), "2x")["target_length"] == 2048


class Stop(Exception):
    pass


def test_eval_ppl_cli_parses_32k(tmp_path, monkeypatch):
    """``rope-ext eval ppl --lengths 32k`` reaches the window selection with 32768 tokens (stopped there)."""
    import rope_ext.eval.ppl as ppl
    import rope_ext.eval.runner as runner

    model = build_model(LabConfig(context=16, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()
    seen = {}

    def stop(data, lengths, *args, **kwargs):
        seen["lengths"] = list(lengths)
        raise Stop

    monkeypatch.setattr(rope_ext, "load", lambda name, **kw: (model, byte_tokenizer()))
    monkeypatch.setattr(runner, "set_threads", lambda threads: torch.get_num_threads())
    monkeypatch.setattr(ppl, "select_windows", stop)
    with pytest.raises(Stop):
        main(["eval", "ppl", "--model", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--lengths", "32k,2x",
              "--methods", "none", "--no-sliding", "--no-report"])
    assert seen["lengths"] == [32768, 32]


def test_eval_refuses_a_one_token_length():
    from rope_ext.eval.ppl import perplexity

    model = build_model(LabConfig(context=16, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()
    with pytest.raises(ValueError, match="at least 2 tokens, got '1'"):
        perplexity(model, torch.arange(3, 40), ["1"], ["none"], sliding=False, progress=False)
