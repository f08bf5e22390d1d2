"""Reports from partial and complete runs."""
from __future__ import annotations

import csv
import importlib
import math

import pytest
import torch
from rope_ext.eval import ppl
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.report import MARK, NO_DOCS, NOTE, write_report
from rope_ext.eval.report_plots import ppl_plot_text, tokens_label
from rope_ext.eval.results import ResultStore
from rope_ext.eval.spec import SLIDING
from rope_ext.eval.tokens import byte_tokenizer

pk = importlib.import_module("rope_ext.eval.passkey")  # the package re-exports the function passkey
plots_module = importlib.import_module("rope_ext.eval.report_plots")
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


def ppl_record(method: str, length: int, means: list[float], docs: bool = True) -> tuple[dict, dict]:
    """A PPL cell whose window i has NLL ``means[i]`` at every position (trained length T)."""
    nll = torch.tensor(means, dtype=torch.float64)[:, None].expand(len(means), length - 1)
    result = ppl.summarize(nll, T, 4)
    if not docs:
        del result["documents"]
    key = {"task": "ppl", "model": {"name": "m", "fingerprint": "f"}, "method": method, "params": {}, "length": length,
           "trained_length": T, "mode": "truncate", "n_docs": len(means), "doc_stride": None, "seed": 0,
           "sample": f"s{length}", "buckets": 4}
    return key, result


def write_cells(path, cells: list[tuple[dict, dict]]) -> None:
    path.mkdir(exist_ok=True)
    store = ResultStore(path / "results.jsonl")
    for key, result in cells:
        store.append(key, result)


BASE = [2.0, 2.6, 1.7, 2.3, 2.1]


def grid(b_means: list[float], docs: bool = True) -> list[tuple[dict, dict]]:
    return [ppl_record(m, L, means, docs) for L in (T, 2 * T, 4 * T)
            for m, means in (("a", [x + 0.05 for x in BASE]), ("b", b_means), (SLIDING, BASE))]


def summary(path) -> str:
    return write_report(path).read_text().split("## Summary")[1].split("\n## ")[0]


def test_overlapping_intervals_give_no_ranking(tmp_path):
    write_cells(tmp_path, grid([x + d for x, d in zip(BASE, (0.2, -0.1, 0.15, -0.05, 0.0))]))
    text = summary(tmp_path)
    assert "Best method" not in text and "better" not in text
    assert f"b has the lowest point estimate but is not distinguishable at n=5 from a (paired ratio b / a {math.exp(-0.01):.2f}x" in text and "no method is ranked" in text
    assert "n=5 window(s)" in text and "above the baseline" in text


def test_separated_intervals_name_the_best_method(tmp_path):
    write_cells(tmp_path, grid([x + 0.4 for x in BASE]))
    text = summary(tmp_path)
    ratio = math.exp(0.05 - 0.4)
    assert f"Best method: a (PPL below every other method's; to the next, b, paired ratio {ratio:.2f}x" in text
    assert "no method is ranked" not in text
    rows = {(r["method"], r["length"]): r for r in csv.DictReader((tmp_path / "report" / "ppl.csv").read_text().splitlines())}
    row = rows[("b", str(4 * T))]
    assert float(row["past_vs_baseline"]) == pytest.approx(math.exp(0.4))
    assert float(row["past_vs_baseline_low"]) == pytest.approx(math.exp(0.4)) == pytest.approx(float(row["past_vs_baseline_high"]))
    assert float(row["ppl_past_low"]) <= float(row["ppl_past"]) <= float(row["ppl_past_high"]) and row["n"] == "5"


def test_old_records_without_per_window_values_still_report(tmp_path):
    write_cells(tmp_path, grid([x + 0.4 for x in BASE], docs=False))
    report = write_report(tmp_path).read_text()
    assert f"{MARK} {NO_DOCS}." in report
    assert "Best method" not in report and f"No method is ranked: {NO_DOCS}." in report
    none_past = math.exp(sum(x + 0.4 for x in BASE) / 5)
    assert f"| b | – | {none_past:.2f} {MARK} |" in report
    rows = list(csv.DictReader((tmp_path / "report" / "ppl.csv").read_text().splitlines()))
    assert {r["interval_note"] for r in rows} == {NO_DOCS} and {r["ppl_low"] for r in rows} == {""}


def test_passkey_ranking_only_when_wilson_intervals_separate(model, tmp_path):
    def cells(rates: dict[str, int]) -> list[tuple[dict, dict]]:
        out = []
        for m, right in rates.items():
            key = {"task": "passkey", "model": {"name": "m", "fingerprint": "f"}, "method": m, "params": {}, "length": 4 * T,
                   "trained_length": T, "depth": 0.5, "trials": 20, "n_keys": 1, "format": "compact", "seed": 0, "filler": "x"}
            out.append((key, pk.score(["12345"] * right + ["0"] * (20 - right), ["12345"] * 20, 0.5)))
        return out

    write_cells(tmp_path / "far", cells({"a": 20, "b": 2}))
    text = summary(tmp_path / "far")
    assert "Best method: a" in text and "a 100% (84–100%) n=20" in text
    write_cells(tmp_path / "near", cells({"a": 13, "b": 11}))
    text = summary(tmp_path / "near")
    assert "Best method" not in text and "a has the highest point estimate but is not distinguishable from b at n=20" in text
    rows = list(csv.DictReader((tmp_path / "near" / "report" / "passkey.csv").read_text().splitlines()))
    assert [(r["successes"], round(float(r["exact_low"]), 4)) for r in rows] == [("13", 0.4329), ("11", 0.3421)]


def test_plot_text_follows_the_data(tmp_path, monkeypatch):
    assert "past the trained length" not in " ".join(ppl_plot_text(False, True, 8192))
    assert "within the trained length 8k" in ppl_plot_text(False, True, 8192)[0]
    title, ylabel = ppl_plot_text(True, True, 128)
    assert "open" in title and "whole window" in ylabel and "past the trained length" in ylabel
    assert ppl_plot_text(True, False, 128)[1] == "PPL of the predictions past the trained length"
    seen = []
    real = plots_module.ppl_plot_text
    monkeypatch.setattr(plots_module, "ppl_plot_text", lambda *a: seen.append(a) or real(*a))
    write_cells(tmp_path / "inside", [ppl_record(m, L, BASE) for m in ("a", "b") for L in (T // 2, T)])
    write_report(tmp_path / "inside")
    write_cells(tmp_path / "mixed", grid(BASE))
    write_report(tmp_path / "mixed")
    assert seen == [(False, True, T), (True, True, T)]
    assert [tokens_label(x) for x in (512, 1024, 2048, 1000, 131072, 1 << 20)] == ["512", "1k", "2k", "1000", "128k", "1M"]
