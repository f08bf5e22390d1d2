"""The results store under damage: only a torn (incomplete) last line is cut; a complete last record
without its newline is kept; any other damaged record stops the command, naming the file and line,
with ``--repair`` as the way on; the report refuses records it cannot read the same way; a failed
eval command leaves no run directory behind."""
from __future__ import annotations

import json

import pytest

from rope_ext.cli import main
from rope_ext.eval.report import report_problem, write_report
from rope_ext.eval.results import RESULTS, ResultStore, RunDir, cell_id


def record(i: int) -> dict:
    key = {"task": "toy", "i": i}
    return {"id": cell_id(key), "key": key, "result": {"value": i}, "meta": {}}


def write(path, records: list, tail: bytes = b"\n") -> None:
    path.write_bytes(b"\n".join(json.dumps(r).encode() if isinstance(r, dict) else r for r in records) + tail)


def test_a_complete_last_record_without_newline_is_kept_and_appended_after(tmp_path):
    path = tmp_path / RESULTS
    write(path, [record(0), record(1)], tail=b"")
    store = ResultStore(path)
    assert len(store) == 2
    store.append({"task": "toy", "i": 2}, {"value": 2})
    again = ResultStore(path)
    assert len(again) == 3 and [json.loads(line)["key"]["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_only_an_incomplete_last_line_is_cut(tmp_path):
    path = tmp_path / RESULTS
    write(path, [record(0), json.dumps(record(1)).encode()[:20]], tail=b"")
    store = ResultStore(path)
    assert len(store) == 1
    store.append({"task": "toy", "i": 2}, {"value": 2})
    assert [json.loads(line)["key"]["i"] for line in path.read_text().splitlines()] == [0, 2]


@pytest.mark.parametrize("damage,why", [
    (b"not json", "line 2: not valid JSON"),
    (b"[1, 2]", "line 2: a JSON list, not an object"),
    (json.dumps({**record(1), "id": "0" * 20}).encode(), "line 2: its id does not match its key"),
    (json.dumps({k: v for k, v in record(1).items() if k != "result"}).encode(), "line 2: field 'result' missing"),
])
def test_a_damaged_record_stops_naming_the_line_and_repair_drops_only_it(tmp_path, damage, why):
    path = tmp_path / RESULTS
    write(path, [record(0), damage, record(2)])
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{RESULTS}: damaged record.*{why}.*--repair"):
        ResultStore(path)
    assert path.read_bytes() == before
    with pytest.warns(UserWarning, match=why):
        store = ResultStore(path, repair=True)
    assert len(store) == 2 and len(ResultStore(path)) == 2
    assert [json.loads(line)["key"]["i"] for line in path.read_text().splitlines()] == [0, 2]


def ppl_record(**result) -> dict:
    key = {"task": "ppl", "model": {"name": "m", "fingerprint": "f"}, "method": "none", "trained_length": 8, "length": 16}
    return {"id": cell_id(key), "key": key, "result": result, "meta": {}}


def test_the_report_names_a_record_it_cannot_read(tmp_path):
    good = ppl_record(ppl=3.0, buckets=[{"start": 0, "end": 16, "ppl": 3.0}])
    assert report_problem(good) is None
    assert report_problem(ppl_record(buckets=[])) == "no result.ppl"
    assert "result.buckets" in report_problem(ppl_record(ppl=3.0, buckets=[{"end": 3}]))
    docs = [{"nll_sum": 1.0, "tokens": 16, "nll_sum_past": 0.5, "tokens_past": 8, "nll_sum_within": 0.5, "tokens_within": 8,
             "bucket_nll_sums": [1.0]}]
    assert report_problem(ppl_record(ppl=3.0, buckets=good["result"]["buckets"], documents=docs)) is None
    assert "result.documents is not a list of objects with nll_sum" in report_problem(
        ppl_record(ppl=3.0, buckets=good["result"]["buckets"], documents=[{"nll_sum": 1.0}]))
    assert "bucket_nll_sums do not match" in report_problem(ppl_record(ppl=3.0, buckets=[], documents=docs))
    write(tmp_path / RESULTS, [ppl_record(buckets=[])])
    assert main(["report", str(tmp_path)]) == 2
    assert not (tmp_path / "report.md").exists()
    with pytest.warns(UserWarning, match="no result.ppl"):
        write_report(tmp_path, repair=True)
    assert (tmp_path / RESULTS).read_text() == "" and (tmp_path / "report.md").exists()


def test_a_failed_eval_leaves_no_run_directory_behind(tmp_path, capsys):
    run_dir = tmp_path / "new" / "run"
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    assert main(["eval", "ppl", "--model", str(bad_model), "--run-dir", str(run_dir), "--lengths", "64"]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_failed_eval_keeps_an_existing_run_directory_and_its_results(tmp_path):
    write(tmp_path / RESULTS, [record(0)])
    run = RunDir(tmp_path)
    run.discard_if_unused()
    assert (tmp_path / RESULTS).read_text().count("\n") == 1
    empty = tmp_path / "empty"
    RunDir(empty).discard_if_unused()
    assert not empty.exists()
