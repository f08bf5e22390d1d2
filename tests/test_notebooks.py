"""The notebooks run top to bottom (on a tiny lab model: ROPE_EXT_NB_FAST=1) and are stored without outputs."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
ARTIFACTS = {
    "quickstart.ipynb": ["runs/quickstart/report.md", "runs/quickstart/quickstart_ppl.png", "runs/quickstart/results.jsonl"],
    "base_bound_and_methods.ipynb": ["runs/base_bound/base_bound.png", "runs/base_bound/wavelengths.png", "runs/base_bound/report.md"],
}


def test_both_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= set(ARTIFACTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_on_the_lab_model(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ROPE_EXT_NB_FAST", "1")
    monkeypatch.setenv("ROPE_EXT_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    for artifact in ARTIFACTS.get(path.name, []):
        assert (tmp_path / artifact).is_file(), artifact
