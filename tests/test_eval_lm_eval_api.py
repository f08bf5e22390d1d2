"""lm-eval from Python with one import: ``import rope_ext.eval`` registers the ``rope_ext`` model type and
the rope_ext tasks; the passkey tasks report one metric per requested length (exact_match@L, digit_acc@L)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import LM
from lm_eval.api.registry import get_model, model_registry
from lm_eval.tasks import TaskManager
from lm_eval.tasks import manager as task_manager_module
from rope_ext.eval import lm_eval_tasks
from rope_ext.eval.lab import LabConfig, pretrain
from rope_ext.eval.lm_eval_model import RopeExtLM

import rope_ext

LAB = {"context": 64, "layers": 1, "hidden": 32, "heads": 2, "intermediate": 32, "batch": 2, "warmup": 1, "lr": 1e-2}
FILLER = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n" * 40
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def filler(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("filler") / "filler.txt"
    path.write_text(FILLER)
    return str(path)


@pytest.fixture(scope="module")
def lab64(tmp_path_factory, filler) -> str:
    """A lab model trained 64 tokens (one step: only its tokenizer and trained length matter here)."""
    return str(pretrain(LabConfig(**LAB, steps=1, corpus=filler), tmp_path_factory.mktemp("lab64") / "lm"))


@pytest.fixture(scope="module")
def digits_lm(tmp_path_factory, lab64) -> str:
    """``lab64`` with every embedding row but the digits' zeroed (embeddings are tied): the output layer
    scores every other token 0, so its answers are digits and digit_acc is not trivially 0."""
    import torch
    from rope_ext.eval.tokens import encode
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("digits") / "lm"
    shutil.copytree(lab64, path)
    _, tokenizer = rope_ext.load(lab64)
    weights = load_file(path / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    keep = torch.zeros(embed.shape[0], 1)
    keep[encode(tokenizer, "0123456789")] = 1
    weights["model.embed_tokens.weight"] = embed * keep
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def first_digits(text: str, key: str) -> str:
    run = re.search(r"[0-9]+", text)
    return run.group(0)[: len(key)] if run else ""


def reference_scores(pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """(exact match, per-digit accuracy) of (generated, key) pairs, computed here."""
    got = [(first_digits(text, key), key) for text, key in pairs]
    exact = sum(g == k for g, k in got) / len(got)
    digits = sum(sum(a == b for a, b in zip(g, k)) for g, k in got) / sum(len(k) for _, k in got)
    return exact, digits


class KeyReader(LM):
    """A fake LM for generate_until: reads the pass key out of the compact prompt ("#NNNNN.") and answers
    it for prompts shorter than ``cut`` characters or whose key sentence sits at the start; otherwise
    it answers the key with its last two digits replaced by "00"."""

    def __init__(self, cut: int) -> None:
        super().__init__()
        self.cut = cut

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for request in requests:
            prompt = request.args[0]
            key = re.search(r"#(\d{5})\. ", prompt).group(1)
            right = len(prompt) < self.cut or prompt.startswith(" pass key #")
            answers.append(key if right else key[:3] + "00")
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def light_task_manager(metadata: dict) -> TaskManager:
    """Only the rope_ext tasks (lm-eval's own ~15k take seconds to index)."""
    return TaskManager(include_defaults=False, include_path=str(lm_eval_tasks.TASKS_DIR), metadata=metadata)


@pytest.mark.parametrize("lengths,want", [("1x,2x", [64, 128]), ("96", [96]), (["2x", 80, "1x"], [128, 80, 64])])
def test_each_requested_length_gets_its_own_metric_from_the_docs_of_that_length(lab64, filler, lengths, want):
    metadata = {"pretrained": lab64, "max_length": 128, "passkey_lengths": lengths, "passkey_depths": "0,0.5,1",
                "passkey_trials": 2, "passkey_corpus": filler}
    out = lm_eval.simple_evaluate(model=KeyReader(cut=100), tasks=["rope_ext_passkey"], task_manager=light_task_manager(metadata),
                                  bootstrap_iters=0)
    results = out["results"]["rope_ext_passkey"]
    samples = out["samples"]["rope_ext_passkey"]
    assert sorted(s["doc"]["length"] for s in samples) == sorted(want * 6)
    per_length = {k.split(",")[0] for k in results if "@" in k and "_stderr" not in k}
    assert per_length == {f"{m}@{L}" for L in want for m in ("exact_match", "digit_acc")}
    for L in want:
        pairs = [(s["resps"][0][0], s["doc"]["key"]) for s in samples if s["doc"]["length"] == L]
        exact, digits = reference_scores(pairs)
        assert results[f"exact_match@{L},none"] == pytest.approx(exact)
        assert results[f"digit_acc@{L},none"] == pytest.approx(digits)
    exact, digits = reference_scores([(s["resps"][0][0], s["doc"]["key"]) for s in samples])
    assert results["exact_match,none"] == pytest.approx(exact) and results["digit_acc,none"] == pytest.approx(digits)
    assert out["higher_is_better"]["rope_ext_passkey"][f"exact_match@{want[0]}"] is True
    if len(want) > 1:  # the fake model misses the long prompts at depths > 0: lengths really differ
        assert len({results[f"exact_match@{L},none"] for L in want}) > 1


def test_limit_covers_every_length_first(lab64, filler):
    metadata = {"pretrained": lab64, "max_length": 128, "passkey_lengths": "1x,2x", "passkey_corpus": filler}
    out = lm_eval.simple_evaluate(model=KeyReader(cut=100), tasks=["rope_ext_passkey"], task_manager=light_task_manager(metadata),
                                  limit=2, bootstrap_iters=0)
    assert [s["doc"]["length"] for s in out["samples"]["rope_ext_passkey"]] == [64, 128]
    assert {"exact_match@64,none", "exact_match@128,none"} <= set(out["results"]["rope_ext_passkey"])


def test_bad_passkey_metadata_is_refused_when_the_task_is_built(lab64):
    with pytest.raises(ValueError, match="unknown metadata passkey_length; allowed"):
        light_task_manager({"pretrained": lab64, "passkey_length": "1x"}).load(["rope_ext_passkey"])
    with pytest.raises(ValueError, match="passkey_lengths must be .*got 'ten'"):
        light_task_manager({"pretrained": lab64, "passkey_lengths": "ten"}).load(["rope_ext_passkey"])
    with pytest.raises(ValueError, match="needs the model's tokenizer: give pretrained=PATH"):
        light_task_manager({}).load(["rope_ext_passkey_classic"])


def test_the_model_type_is_registered_lazily_beside_lm_evals_own():
    assert model_registry.get("rope_ext") is RopeExtLM and get_model("rope_ext") is RopeExtLM
    assert "hf" in model_registry and "dummy" in model_registry


@pytest.fixture
def indexed_paths(monkeypatch) -> list:
    """The directories each TaskManager built here asks lm-eval to index (the index itself is skipped)."""
    seen: list = []

    def build(paths, **kwargs):
        seen.append([str(p) for p in paths])
        return {}

    monkeypatch.setattr(task_manager_module.TaskIndex, "build", staticmethod(build))
    return seen


def test_task_managers_index_our_tasks_after_lm_evals_and_before_the_callers(indexed_paths, tmp_path):
    defaults, ours, mine = str(Path(task_manager_module.__file__).parent), str(lm_eval_tasks.TASKS_DIR), str(tmp_path)
    TaskManager()
    TaskManager(metadata={"a": 1})
    TaskManager(None, mine)
    TaskManager(include_path=[mine, mine + "2"])
    TaskManager(include_path=[ours, mine])
    TaskManager(include_path=ours + "/../tasks")
    TaskManager(include_defaults=False, include_path=mine)
    TaskManager(include_defaults=False)
    assert indexed_paths == [[defaults, ours], [defaults, ours], [defaults, ours, mine], [defaults, ours, mine, mine + "2"],
                             [defaults, ours, mine], [defaults, ours + "/../tasks"], [mine], []]


def test_register_is_idempotent_and_unregister_restores_lm_eval(indexed_paths):
    wrapped = TaskManager.__init__
    original = wrapped.rope_ext_original
    lm_eval_tasks.register()
    assert TaskManager.__init__ is wrapped and model_registry.get("rope_ext") is RopeExtLM
    try:
        lm_eval_tasks.unregister_tasks()
        assert TaskManager.__init__ is original
        lm_eval_tasks.unregister_tasks()
        assert TaskManager.__init__ is original
        TaskManager()
        assert indexed_paths == [[str(Path(task_manager_module.__file__).parent)]]
    finally:
        lm_eval_tasks.register()
    assert TaskManager.__init__ is not original and TaskManager.__init__.rope_ext_original is original


@pytest.mark.slow
def test_rope_ext_eval_imports_without_lm_eval():
    code = ("import sys\n"
            "class NotInstalled:\n"  # what Python does when lm_eval is not installed
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'lm_eval':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NotInstalled())\n"
            "import rope_ext.eval\n"
            "assert callable(rope_ext.eval.passkey) and callable(rope_ext.eval.perplexity)\n"
            "assert not [m for m in sys.modules if m.startswith('lm_eval')]\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok" and "could not be registered" not in done.stderr


SNIPPET = '''
import rope_ext.eval, lm_eval
res = lm_eval.simple_evaluate(model="rope_ext", model_args="pretrained={dir},method=rerope,max_length=512",
                              tasks=["rope_ext_passkey"], limit=4, metadata={{"passkey_lengths": "1x,2x"}})
'''
REPORT = '''
import json
samples = [{{"length": s["doc"]["length"], "depth": s["doc"]["depth"], "trial": s["doc"]["trial"], "key": s["doc"]["key"],
            "text": s["resps"][0][0]}} for s in res["samples"]["rope_ext_passkey"]]
print("RESULT " + json.dumps({{"results": res["results"]["rope_ext_passkey"], "samples": samples,
                               "params": res["config"]["rope_ext_params"]}}))
'''


@pytest.mark.slow
def test_the_issue_snippet_runs_with_one_import_and_matches_rope_ext_passkey(digits_lm):
    done = subprocess.run([sys.executable, "-c", SNIPPET.format(dir=digits_lm) + REPORT.format()], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    results, samples = out["results"], out["samples"]
    assert sorted((s["length"], s["depth"], s["trial"]) for s in samples) == [(64, 0.0, 0), (64, 0.25, 0), (128, 0.0, 0), (128, 0.25, 0)]
    assert {k.split(",")[0] for k in results if "@" in k and "_stderr" not in k} == {
        "exact_match@64", "exact_match@128", "digit_acc@64", "digit_acc@128"}

    model, tokenizer = rope_ext.load(digits_lm)
    records = rope_ext.eval.passkey(model, tokenizer, [64, 128], ["rerope"], depths=[0.0, 0.25], trials=1, progress=False)
    assert all(r["key"]["params"] == out["params"] for r in records)
    by_cell = {(r["key"]["length"], r["key"]["depth"]): r["result"] for r in records}
    for s in samples:
        cell = by_cell[(s["length"], s["depth"])]
        assert cell["keys"] == [s["key"]] and cell["predictions"] == [first_digits(s["text"], s["key"])]
    assert all(s["text"].isdigit() for s in samples)  # answers in digits: digit_acc is not trivially 0
    for L in (64, 128):
        cells = [by_cell[(L, d)] for d in (0.0, 0.25)]
        assert results[f"exact_match@{L},none"] == pytest.approx(sum(c["exact"] for c in cells) / 2)
        assert results[f"digit_acc@{L},none"] == pytest.approx(sum(c["digit_acc"] for c in cells) / 2)
        exact, digits = reference_scores([(s["text"], s["key"]) for s in samples if s["length"] == L])
        assert (results[f"exact_match@{L},none"], results[f"digit_acc@{L},none"]) == pytest.approx((exact, digits))
