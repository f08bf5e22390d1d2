"""Passkey prompts, scoring, and the grid on a tiny model."""
from __future__ import annotations

import importlib
import random

import pytest
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.tokens import byte_tokenizer, decode, encode

pk = importlib.import_module("rope_ext.eval.passkey")  # the package re-exports the function passkey
T = 32


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def filler(tok):
    return encode(tok, "lorem ipsum # dolor sit amet, 123 consectetur. " * 40)


@pytest.mark.parametrize("fmt,length", [("compact", 96), ("compact", 200), ("classic", 300), ("classic", 420)])
def test_prompt_length_and_key_position(tok, filler, fmt, length):
    style = pk.FORMATS[fmt]
    stream = filler if fmt == "compact" else pk.filler_stream(tok, style, "stdlib", "eval", length)
    for depth in (0.0, 0.3, 0.5, 1.0):
        prompt, key, answer = pk.build_prompt(tok, style, stream, length, depth, random.Random(1))
        assert prompt.numel() + answer.numel() == length
        text = decode(tok, prompt)
        sentence = style.key.format(label="", key=key)
        question = style.question.format(label="")
        assert text.endswith(question) and text.count(sentence) == 1
        assert decode(tok, answer) == style.answer.format(key=key)
        budget = length - len(style.prefix) - len(sentence) - len(question) - answer.numel()
        assert text.index(sentence) == len(style.prefix) + round(depth * budget)


def test_compact_filler_has_no_marker(tok):
    stream = pk.filler_stream(tok, pk.FORMATS["compact"], "stdlib", "eval", 5000)
    assert "#" not in decode(tok, stream[:20000])


def test_multi_key_prompt_asks_one_of_its_keys(tok, filler):
    prompt, key, _ = pk.build_prompt(tok, pk.FORMATS["compact"], filler, 160, 0.25, random.Random(4), n_keys=3)
    text = decode(tok, prompt)
    labels = [int(c) for c in "123" if f"pass key {c} #" in text]
    assert labels == [1, 2, 3]
    asked = int(text.rsplit("What is the pass key ", 1)[1][0])
    assert f"pass key {asked} #{key}." in text


def test_too_short_length_is_an_error(tok, filler):
    with pytest.raises(ValueError, match="passkey length 20 is too short"):
        pk.build_prompt(tok, pk.FORMATS["compact"], filler, 20, 0.5, random.Random(0))


def test_score():
    s = pk.score(["12345", " 1234x9", "no digits"], ["12345", "12349", "55555"])
    assert s["exact"] == pytest.approx(1 / 3)
    assert s["digit_acc"] == pytest.approx((5 + 4 + 0) / 15)
    assert s["predictions"] == ["12345", "1234", ""]
    assert s["outcomes"] == [{"depth": None, "trial": 0, "correct": True, "digits": 5},
                             {"depth": None, "trial": 1, "correct": False, "digits": 4},
                             {"depth": None, "trial": 2, "correct": False, "digits": 0}]


def test_passkey_grid_and_resume(tok, tmp_path, monkeypatch):
    model = build_model(LabConfig(context=T, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()
    args = dict(lengths=["2x", "3x"], methods=["none", "yarn", "rerope"], depths=(0.0, 1.0), trials=3, progress=False)
    recs = pk.passkey(model, tok, run_dir=tmp_path, **args)
    assert len(recs) == 2 * 3 * 2
    first = recs[0]["key"]
    assert (first["length"], first["method"], first["depth"]) == (2 * T, "none", 0.0)
    assert all(len(r["result"]["keys"]) == 3 and 0 <= r["result"]["exact"] <= 1 for r in recs)
    keys = {(r["key"]["length"], r["key"]["depth"]): r["result"]["keys"] for r in recs if r["key"]["method"] == "none"}
    assert all(r["result"]["keys"] == keys[(r["key"]["length"], r["key"]["depth"])] for r in recs)
    for r in recs:  # per-trial outcomes: the cell's depth, trials 0..2, agreeing with keys, predictions and the rates
        res = r["result"]
        assert [(o["depth"], o["trial"]) for o in res["outcomes"]] == [(r["key"]["depth"], t) for t in range(3)]
        assert [o["correct"] for o in res["outcomes"]] == [p == k for p, k in zip(res["predictions"], res["keys"])]
        assert sum(o["correct"] for o in res["outcomes"]) == round(3 * res["exact"])
        assert sum(o["digits"] for o in res["outcomes"]) == round(15 * res["digit_acc"])

    def fail(*a, **k):
        raise AssertionError("recomputed a stored cell")

    monkeypatch.setattr(pk, "compute_cell", fail)
    assert [r["result"] for r in pk.passkey(model, tok, run_dir=tmp_path, **args)] == [r["result"] for r in recs]


def test_oracle_generation_scores_perfectly(tok, filler, monkeypatch):
    """With generation replaced by the right answer, every cell is exact: the scoring path reads the
    keys it planted."""
    model = build_model(LabConfig(context=T, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()
    seen = {}

    def oracle(model, tokenizer, prompts, new_tokens, batch_size):
        out = []
        for row in prompts:
            text = decode(tokenizer, row)
            out.append(text.split("pass key #")[1][:5])
        seen["n"] = len(out)
        return out

    monkeypatch.setattr(pk, "generate_answers", oracle)
    recs = pk.passkey(model, tok, ["3x"], ["none"], [0.5], trials=4, progress=False)
    assert seen["n"] == 4 and recs[0]["result"]["exact"] == 1.0 and recs[0]["result"]["digit_acc"] == 1.0
    assert recs[0]["result"]["outcomes"] == [{"depth": 0.5, "trial": t, "correct": True, "digits": 5} for t in range(4)]


def test_bad_passkey_input(tok):
    model = build_model(LabConfig(context=T, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()
    for kwargs, match in ((dict(depths=[1.5]), r"depths must be numbers in \[0, 1\], got \[1\.5\]"),
                          (dict(fmt="fancy"), r"fmt \(--format, the passkey format\) must be one of compact, classic, got 'fancy'"),
                          (dict(trials=0), "trials must be an integer >= 1, got 0"),
                          (dict(methods=["sliding_window"]), "methods: sliding_window is a perplexity baseline")):
        with pytest.raises(ValueError, match=match):
            pk.passkey(model, tok, ["2x"], **{"methods": ["none"], **kwargs}, progress=False)
    with pytest.raises(ValueError, match="passkey length 24 is too short"):
        pk.passkey(model, tok, [24], ["none"], progress=False)
