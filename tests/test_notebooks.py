"""The notebooks are stored without outputs and run top to bottom on a tiny lab model.

The tiny configuration goes in the way papermill's ``-p`` does it: a cell placed right after the
cell tagged "parameters" (``FAST = True`` and a lab cache under the test's temporary directory,
shared by both notebooks so the tiny model is trained once).
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# files each notebook must write (relative to its working directory), and how many inline plots it must show
ARTIFACTS = {
    "quickstart.ipynb": (["runs/quickstart/results.jsonl", "runs/quickstart/report.md", "runs/quickstart/report/ppl.csv",
                          "runs/quickstart/quickstart_ppl.png"], 1),
    "base_bound_and_methods.ipynb": (["runs/base_bound/similarity_margin.png", "runs/base_bound/base_bound.png",
                                      "runs/base_bound/supported_context.png", "runs/base_bound/frequencies.png",
                                      "runs/base_bound/methods_ppl.png", "runs/base_bound/results.jsonl",
                                      "runs/base_bound/report.md"], 5),
}


def parameters_index(book: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"exactly one cell must be tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def run_notebook(path: Path, workdir: Path, parameters: dict) -> nbformat.NotebookNode:
    """Execute ``path`` in ``workdir`` with ``parameters`` injected after its parameters cell."""
    book = nbformat.read(path, as_version=4)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(parameters_index(book) + 1, injected)
    workdir.mkdir(parents=True, exist_ok=True)
    NotebookClient(book, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return book


@pytest.fixture(scope="module")
def lab_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab_cache")


def test_every_notebook_is_checked():
    assert {p.name for p in NOTEBOOKS} == set(ARTIFACTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    raw = path.read_text()
    book = nbformat.reads(raw, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert all("execution" not in c.metadata for c in book.cells)
    assert "image/png" not in raw and '"output_type"' not in raw
    parameters_index(book)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_on_the_lab_model(path, tmp_path, lab_cache):
    book = run_notebook(path, tmp_path / "work", {"FAST": True, "CACHE": str(lab_cache), "THREADS": 1})
    errors = [f"cell {i}: {o.ename}: {o.evalue}" for i, c in enumerate(book.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    files, plots = ARTIFACTS[path.name]
    for artifact in files:
        assert (tmp_path / "work" / artifact).is_file(), artifact
    shown = sum("image/png" in o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert shown >= plots, f"{shown} inline plots shown, expected at least {plots}"
    assert list(lab_cache.iterdir()), "the lab model was not trained into the given cache"
