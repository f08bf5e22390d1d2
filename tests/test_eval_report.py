"""Reports from partial and complete runs."""
from __future__ import annotations

import csv
import importlib

import pytest
import torch
from rope_ext.eval import ppl
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.report import NOTE, write_report
from rope_ext.eval.tokens import byte_tokenizer

pk = importlib.import_module("rope_ext.eval.passkey")  # the package re-exports the function passkey
T = 16


@pytest.fixture(scope="module")
def model():
    return build_model(LabConfig(context=T, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()


def test_report_from_partial_jsonl(model, tmp_path, monkeypatch):
    docs = [torch.randint(3, 259, (4 * T,), generator=torch.Generator().manual_seed(1))]
    real, calls = ppl.compute_cell, []

    def interrupted(*args, **kwargs):
        if len(calls) == 6:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppl, "compute_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ppl.perplexity(model, docs, ["1x", "2x", "4x"], ["none", "ntk", "rerope"], run_dir=tmp_path, progress=False)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"id": "torn", "key": {"ta')
    report = write_report(tmp_path).read_text()
    assert "| method | **16 (1x, trained)** | 32 (2x) |" in report
    assert "| rerope |" in report and "| sliding_window |" in report
    assert "4x" not in report.split("PPL over the whole window")[1].split("\n")[2]
    assert NOTE in report and "–" in report
    rows = list(csv.DictReader((tmp_path / "report" / "ppl.csv").read_text().splitlines()))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"none", "ntk", "rerope", "sliding_window"}
    assert (tmp_path / "report" / f"ppl_vs_length_{model.config.name_or_path or 'LlamaForCausalLM'}.png").exists() or \
        list((tmp_path / "report").glob("ppl_vs_length_*.png"))
    assert list((tmp_path / "report").glob("ppl_by_position_*_32.png"))


def test_report_tables_match_the_records(model, tmp_path):
    docs = [torch.randint(3, 259, (2 * T,), generator=torch.Generator().manual_seed(2))]
    recs = ppl.perplexity(model, docs, ["1x", "2x"], ["none"], run_dir=tmp_path, progress=False)
    pk.passkey(model, byte_tokenizer(), ["4x"], ["none", "rerope"], [0.0, 1.0], trials=2, run_dir=tmp_path, progress=False)
    report = write_report(tmp_path).read_text()
    past = {r["key"]["method"]: r["result"]["ppl_past"] for r in recs if r["key"]["length"] == 2 * T}
    assert f"| none | – | {past['none']:.2f} |" in report
    assert "| sliding_window | – | 1.00x |" in report
    assert "Passkey retrieval" in report and "Exact match" in report
    assert list((tmp_path / "report").glob("passkey_*.png"))
    rows = list(csv.DictReader((tmp_path / "report" / "passkey.csv").read_text().splitlines()))
    assert len(rows) == 4


def test_report_of_empty_and_missing_run(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    assert "No finished cells" in write_report(tmp_path).read_text()
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")
