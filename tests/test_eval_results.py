"""Results store: resume after interruption, torn lines, bad input leaves results intact."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from rope_ext.eval import ppl
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.results import RESULTS, ResultStore, RunDir, cell_id

from rope_ext import cli

T = 16
GRID = dict(lengths=["1x", "2x", "3x"], methods=["none", "pi", "rerope"], progress=False)


@pytest.fixture(scope="module")
def model():
    return build_model(LabConfig(context=T, layers=1, hidden=32, heads=2, intermediate=32, seed=2), 259).eval()


@pytest.fixture(scope="module")
def docs():
    return [torch.randint(3, 259, (3 * T,), generator=torch.Generator().manual_seed(7))]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_id(records):
    return {r["id"]: r["result"] for r in records}


class Counting:
    def __init__(self, real, fail_after=None):
        self.real, self.fail_after, self.calls = real, fail_after, 0

    def __call__(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.real(*args, **kwargs)


def test_resume_after_interrupt_recomputes_nothing_and_matches(model, docs, tmp_path, monkeypatch):
    reference = ppl.perplexity(model, docs, run_dir=tmp_path / "ref", **GRID)
    total = len(reference)
    assert total == 12
    flaky = Counting(ppl.compute_cell, fail_after=5)
    monkeypatch.setattr(ppl, "compute_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        ppl.perplexity(model, docs, run_dir=tmp_path / "run", **GRID)
    assert len(ResultStore(tmp_path / "run" / RESULTS)) == 5
    counting = Counting(flaky.real)
    monkeypatch.setattr(ppl, "compute_cell", counting)
    resumed = ppl.perplexity(model, docs, run_dir=tmp_path / "run", **GRID)
    assert counting.calls == total - 5
    before = digest(tmp_path / "run" / RESULTS)
    again = ppl.perplexity(model, docs, run_dir=tmp_path / "run", **GRID)
    assert counting.calls == total - 5
    assert digest(tmp_path / "run" / RESULTS) == before
    assert by_id(resumed) == by_id(again) == by_id(reference)


def test_torn_last_line_is_ignored_and_cut(model, docs, tmp_path, monkeypatch):
    ppl.perplexity(model, docs, run_dir=tmp_path, **GRID)
    path = tmp_path / RESULTS
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    assert len(ResultStore(path)) == len(lines) - 1
    counting = Counting(ppl.compute_cell)
    monkeypatch.setattr(ppl, "compute_cell", counting)
    ppl.perplexity(model, docs, run_dir=tmp_path, **GRID)
    assert counting.calls == 1
    assert all(json.loads(line)["id"] for line in path.read_text().splitlines())
    assert len(path.read_text().splitlines()) == len(lines)


def test_store_appends_durably_and_keys_by_content(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    key = {"task": "ppl", "method": "none", "params": {"b": 1, "a": 2}}
    store.append(key, {"ppl": 3.0})
    reordered = {"params": {"a": 2, "b": 1}, "method": "none", "task": "ppl"}
    assert reordered in ResultStore(tmp_path / "r.jsonl")
    assert cell_id(key) == cell_id(reordered) != cell_id({**key, "method": "pi"})
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "key": {}, "result": {}}\nnot json\n{"id": "y"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: damaged record\(s\) \(line 1: its id does not match its key; "
                                         r"line 2: not valid JSON; line 3: field 'key' missing"):
        ResultStore(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("bad,match", [
    (dict(methods=["none", "nosuch"]), "unknown method 'nosuch'"),
    (dict(lengths=["1x", "0"]), "lengths must be at least 2 tokens, got '0'"),
    (dict(lengths=["-4"]), r"lengths must be tokens \(32768\).*got '-4'"),
    (dict(method_params={"rerope": {"windw": 4}}), r"rerope: unknown parameter\(s\) windw; allowed: .*window"),
    (dict(method_params={"rerope": {"window": T}}), f"rerope: window={T} must be < the trained length {T}"),
    (dict(method_params={"yarn": {"factor": 2.0}}), "method_params for yarn, which are not among the methods run"),
    (dict(mode="chunked"), "mode must be one of truncate, concat, got 'chunked'"),
    (dict(n_docs=0), "n_docs must be an integer >= 1, got 0"),
])
def test_bad_input_is_refused_before_any_change(model, docs, tmp_path, monkeypatch, bad, match):
    ppl.perplexity(model, docs, run_dir=tmp_path, **GRID)
    before = digest(tmp_path / RESULTS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(ppl, "compute_cell", Counting(ppl.compute_cell, fail_after=0))
    with pytest.raises(ValueError, match=match):
        ppl.perplexity(model, docs, run_dir=tmp_path, **{**GRID, **bad})
    assert digest(tmp_path / RESULTS) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_empty_corpus_is_refused(model, tmp_path):
    from rope_ext.eval.tokens import byte_tokenizer

    ppl.perplexity(model, [torch.arange(3, 3 + 2 * T)], run_dir=tmp_path / "run", lengths=["1x"], methods=["none"], progress=False)
    before = digest(tmp_path / "run" / RESULTS)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"corpus '.*blank\.txt' \(split 'eval'\) is empty"):
        ppl.perplexity(model, byte_tokenizer(), ["1x"], ["none"], corpus=str(tmp_path / "blank.txt"), run_dir=tmp_path / "run", progress=False)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match=rf"only 0 document\(s\) have >= {T} tokens; need 1"):
        ppl.perplexity(model, byte_tokenizer(), ["1x"], ["none"], corpus=str(tmp_path / "short.txt"), run_dir=tmp_path / "run", progress=False)
    assert digest(tmp_path / "run" / RESULTS) == before


def test_unwritable_run_dir_fails_before_compute(model, docs, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(ppl, "compute_cell", Counting(ppl.compute_cell, fail_after=0))
    with pytest.raises(PermissionError, match="not writable"):
        ppl.perplexity(model, docs, run_dir=tmp_path / "file" / "run", **GRID)
    with pytest.raises(PermissionError, match="not writable"):
        RunDir(tmp_path / "file")


def test_cli_bad_input_exits_2_with_message(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULTS).write_text('{"id": "a", "key": {"task": "ppl"}, "result": {}, "meta": {}}\n')
    before = digest(run / RESULTS)
    assert cli.main(["eval", "ppl", "--model", str(tmp_path / "missing"), "--run-dir", str(run)]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", "--model", str(tmp_path), "--run-dir", str(run), "--methods", "none,bogus"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", "--model", str(tmp_path), "--run-dir", str(run), "--method-params", "rerope:window=3"]) == 2
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["report", str(tmp_path / "file")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert digest(run / RESULTS) == before


def test_config_keeps_every_distinct_invocation(model, docs, tmp_path):
    ppl.perplexity(model, docs, run_dir=tmp_path, record={"command": "a"}, **GRID)
    ppl.perplexity(model, docs, run_dir=tmp_path, record={"command": "b"}, **{**GRID, "lengths": ["1x"]})
    ppl.perplexity(model, docs, run_dir=tmp_path, record={"command": "a"}, **GRID)
    invocations = json.loads((tmp_path / "config.json").read_text())["invocations"]
    assert [c["command"] for c in invocations] == ["b", "a"]
    assert invocations[1]["params"]["rerope@48"] == {"window": T // 2}
    assert invocations[1]["settings"]["mode"] == "truncate"


def test_thread_choice(monkeypatch):
    from rope_ext.eval.runner import choose_threads

    assert choose_threads(3) == 3
    with pytest.raises(ValueError, match=r"threads \(requested\) must be an integer >= 1, got 0"):
        choose_threads(0)
    monkeypatch.setattr("os.getloadavg", lambda: (1.5, 0.0, 0.0))
    assert choose_threads() == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.0, 0.0))
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert choose_threads() == 6


def test_old_records_without_per_window_values_are_kept_and_reported(model, tmp_path, monkeypatch):
    """A run directory written before records kept per-window values: resuming appends new-format
    cells after the old lines (left byte for byte), and the report marks only the old cells."""
    from rope_ext.eval.report import MARK, NO_DOCS, write_report

    docs = [torch.randint(3, 259, (3 * T,), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    grid = dict(GRID, lengths=["2x"], n_docs=2)
    ppl.perplexity(model, docs, run_dir=tmp_path, **grid)
    path = tmp_path / RESULTS
    old = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        del record["result"]["documents"]
        old.append(json.dumps(record))
    path.write_text("\n".join(old) + "\n")
    before = path.read_bytes()
    counting = Counting(ppl.compute_cell)
    monkeypatch.setattr(ppl, "compute_cell", counting)
    ppl.perplexity(model, docs, run_dir=tmp_path, **{**grid, "lengths": ["2x", "3x"]})
    assert counting.calls == 4 and path.read_bytes().startswith(before)
    report = write_report(tmp_path).read_text()
    table = report.split("**PPL of the tokens past the trained length**")[1].split("\n\n")[1]
    rerope = next(line for line in table.splitlines() if line.startswith("| rerope |"))
    cells = [c.strip() for c in rerope.split("|")[2:4]]
    assert cells[0].endswith(MARK) and "(" in cells[1] and MARK not in cells[1]
    assert f"{MARK} {NO_DOCS}." in report
