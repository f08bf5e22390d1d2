"""``rope-ext generate``: the streamed greedy text equals ``model.generate`` with the same patch, the
progress bar shows a flat cache with sinks, and bad input is one clear line."""
from __future__ import annotations

import re

import pytest
import torch

import rope_ext
from rope_ext.cli import main
from rope_ext.eval.lab import LabConfig, pretrain

TINY = {"context": 16, "layers": 1, "hidden": 32, "heads": 2, "intermediate": 32, "steps": 20, "batch": 2, "warmup": 1, "lr": 1e-2}


@pytest.fixture(scope="module")
def lab_lm(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 80)
    return str(pretrain(LabConfig(**TINY, corpus=str(corpus)), tmp_path_factory.mktemp("lab") / "lm"))


def test_streamed_text_equals_generate_and_the_cache_stays_flat(lab_lm, capsys):
    args = ["generate", "--model", lab_lm, "--prompt", "def add", "--max-new-tokens", "60", "--method", "yarn",
            "--param", "factor=2", "--sinks", "2", "--cache-window", "10", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr()
    model, tok = rope_ext.load(lab_lm)
    rope_ext.patch(model, "yarn", factor=2, sinks=2, cache_window=10)
    ids = tok("def add", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert printed.out.rstrip("\n") == tok.decode(want.tolist())
    sizes = {float(m) for m in re.findall(r"cache_mib=([0-9.]+)", printed.err)[-20:]}
    assert len(sizes) == 1  # flat once the cache is full


@pytest.mark.parametrize("extra,message", [(["--param", "factor"], "NAME=VALUE"), (["--sinks", "-1", "--cache-window", "4"], "sinks"),
                                           (["--temperature", "nan"], "temperature"), (["--max-new-tokens", "0"], "max-new-tokens")])
def test_bad_input_is_one_line(lab_lm, capsys, extra, message):
    args = ["generate", "--model", lab_lm, "--prompt", "x", "--max-new-tokens", "5", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
