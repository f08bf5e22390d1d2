"""RULER-style tasks: exact prompt lengths (byte and BPE tokenizers), needles where the depth says,
answers present in the context, determinism, scoring, cache continuation = full recompute, the
resumable store, the report's tables, the lm-eval tasks, bad input."""
from __future__ import annotations

import copy
import importlib
import os
import re
from collections import Counter

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.report import write_report
from rope_ext.eval.runner import applied
from rope_ext.eval.spec import resolve
from rope_ext.eval.tokens import byte_tokenizer, decode, encode
from rope_ext.facts import rope_spec

R = importlib.import_module("rope_ext.eval.ruler")  # the package re-exports the function ruler
rt = importlib.import_module("rope_ext.eval.ruler_tasks")
pk = importlib.import_module("rope_ext.eval.passkey")
T = 32
SHORT = {"niah_multikey": 700, "niah_multivalue": 900, "variable_tracking": 500, "common_words": 1300}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """SmolLM2's BPE tokenizer, read from the shipped GGUF without the model."""
    from rope_ext.eval.lm_eval_tasks import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def model():
    return build_model(LabConfig(context=T, layers=2, hidden=32, heads=2, intermediate=32), 259).eval()


def _full(prompt: rt.Prompt, q: rt.Question) -> torch.Tensor:
    return torch.cat([prompt.context, q.ids])


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_prompts_have_exactly_the_target_length(request, which):
    tokenizer = request.getfixturevalue("tok" if which == "byte" else "bpe")
    for task, short in SHORT.items():
        for length in (short, short + 333, 5000):
            prompt = rt.build(tokenizer, task, length, 0, 1)
            sizes = [prompt.length(q) for q in prompt.questions]
            assert max(sizes) == length and min(sizes) > length - 12, (task, length, sizes)
            if which == "byte" or len(sizes) == 1:
                assert set(sizes) == {length}, (task, length, sizes)


def test_needles_are_where_the_depth_says(tok):
    depths = [0.0, 0.2, 0.5, 0.9, 1.0]
    prompt = rt.build(tok, "niah_multikey", 1500, 3, 0, depths)
    text = decode(tok, prompt.context)
    needles = []
    for q in prompt.questions:
        key = re.search(r"for (\S+) mentioned", decode(tok, q.ids)).group(1)
        needles.append(rt.NEEDLE.format(key=key, value=q.expected[0]))
    assert [q.depth for q in prompt.questions] == depths
    haystack = len(text) - len(rt.NIAH_HEADER) - sum(map(len, needles))
    for i, (needle, d) in enumerate(zip(needles, depths)):
        assert text.count(needle) == 1
        assert text.index(needle) == len(rt.NIAH_HEADER) + round(d * haystack) + sum(map(len, needles[:i]))


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_the_expected_answer_is_in_the_context_as_asked(request, which):
    tokenizer = request.getfixturevalue("tok" if which == "byte" else "bpe")
    for task in ("niah_multikey", "niah_multivalue"):
        prompt = rt.build(tokenizer, task, 2000, 5, 2)
        text = decode(tokenizer, prompt.context)
        for q in prompt.questions:
            key = re.search(r"for (\S+) mentioned", decode(tokenizer, q.ids)).group(1)
            assert sorted(re.findall(rf"numbers for {re.escape(key)} is: (\d+)\.", text)) == sorted(q.expected)
            assert decode(tokenizer, q.answer) == " " + ", ".join(q.expected) + "."
    prompt = rt.build(tokenizer, "variable_tracking", 1500, 5, 2)
    text, (q,) = decode(tokenizer, prompt.context), prompt.questions
    value = re.search(r"assigned the value (\d+) in", decode(tokenizer, q.ids)).group(1)
    first, *rest = q.expected
    lines = [f"VAR {first} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(q.expected, rest)]
    spots = [text.index(line) for line in lines]
    assert spots == sorted(spots) and all(text.count(line) == 1 for line in lines)
    for length in (2000, 8192):
        prompt = rt.build(tokenizer, "common_words", length, 5, 2)
        text, (q,) = decode(tokenizer, prompt.context), prompt.questions
        entries = re.findall(r" (\d+)\. ([a-z]+)", text[text.index("\n 1. "):])
        assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        frequent, rare = (30, 3) if length == 8192 and which == "bpe" else (6, 1)  # bytes: 30 x 10 entries > half the list
        assert {w: counts[w] for w in q.expected} == {w: frequent for w in q.expected}
        assert set(counts.values()) == {frequent, rare} and len(counts) > len(q.expected)


def test_generation_is_deterministic(tok):
    for task in rt.TASKS:
        a, b = rt.build(tok, task, 1500, 7, 1), rt.build(tok, task, 1500, 7, 1)
        assert torch.equal(a.context, b.context) and [q.expected for q in a.questions] == [q.expected for q in b.questions]
        for other in (rt.build(tok, task, 1500, 7, 2), rt.build(tok, task, 1500, 8, 1)):
            assert [q.expected for q in other.questions] != [q.expected for q in a.questions]


def test_scoring_is_rulers_string_match_all():
    assert rt.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert rt.string_match_all(" uszoq yvtco", ["USZOQ", "YVTCO"]) == 1.0
    assert rt.string_match_all("", ["a"]) == 0.0
    q = rt.Question(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), ("12", "34"), 0.5)
    scored = R.score_prompt(rt.Prompt(torch.zeros(1, dtype=torch.long), (q, q)), ["12 34", "no 34"], "niah_multivalue", 99, 4)
    assert [c["score"] for c in scored["cases"]] == [1.0, 0.5] and scored["score"] == 0.75
    assert [(c["case"], c["depth"], c["length"]) for c in scored["cases"]] == [(4, 0.5, 99), (5, 0.5, 99)]


@pytest.mark.parametrize("method", ["none", "leaky_rerope"])
def test_a_continued_cache_equals_the_full_recompute(tok, model, method):
    prompt = rt.build(tok, "niah_multikey", 900, 0, 0)
    params = resolve(method, {}, 900, rope_spec(model))
    with applied(model, method, params), torch.no_grad():
        answers = R.answer_questions(model, tok, prompt)
        out = model(input_ids=prompt.context[None], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for q, answer in zip(prompt.questions, answers):
            full = _full(prompt, q)[None]
            continued = model(input_ids=q.ids[None], use_cache=True, **{R.cache_kwarg(model): copy.deepcopy(cache)}).logits
            assert torch.allclose(continued, model(input_ids=full).logits[:, -q.ids.numel():], atol=1e-4, rtol=0)
            ids = full
            for _ in range(q.answer.numel()):  # greedy from scratch, one full forward per token
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            assert answer == decode(tok, ids[0, full.shape[1]:])


def _oracle(depth_right: float):
    """An answer_questions that reads each niah question's values out of the context for needles at
    ``depth_right``, answers "0" to the others, and the expected answer to questions without a depth."""
    def answer(model, tokenizer, prompt):
        text = decode(tokenizer, prompt.context)
        out = []
        for q in prompt.questions:
            key = re.search(r"for (\S+) mentioned", decode(tokenizer, q.ids))
            values = re.findall(rf"for {re.escape(key.group(1))} is: (\d+)\.", text) if key else []
            out.append(" ".join(q.expected) if q.depth is None else " ".join(values) if q.depth == depth_right else "0")
        return out
    return answer


def test_store_resumes_and_the_report_has_the_tables(tok, model, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "answer_questions", _oracle(0.25))
    args = dict(lengths=[700, 900], methods=["none", "yarn"], tasks=["niah_multikey", "variable_tracking"], progress=False)
    recs = R.ruler(model, tok, cases=7, run_dir=tmp_path, **args)
    assert len(recs) == 2 * 2 * (2 + 7)
    cases = [c for r in recs if r["key"]["ruler_task"] == "niah_multikey" for c in r["result"]["cases"]]
    assert [c["depth"] for c in cases[:7]] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.25]
    assert all(c["score"] == (c["depth"] == 0.25) for c in cases)
    computed = []
    real = R.compute_cell
    monkeypatch.setattr(R, "compute_cell", lambda *a, **k: computed.append(a[5]) or real(*a, **k))
    assert [r["result"] for r in R.ruler(model, tok, cases=7, run_dir=tmp_path, **args)] == [r["result"] for r in recs]
    assert computed == []
    R.ruler(model, tok, cases=10, run_dir=tmp_path, **args)  # only prompt 1 (now full) and variable_tracking 7..9 are new
    assert sorted(computed) == sorted(["niah_multikey"] * 4 + ["variable_tracking"] * 12)
    report = write_report(tmp_path).read_text()
    assert "## RULER-style tasks" in report and "**niah_multikey**, mean score:" in report
    assert "**variable_tracking**, mean score:" in report and "variable_tracking at 700 tokens" not in report
    assert "niah_multikey at 900 tokens (28.125x), per needle depth:" in report
    rows = [line for line in report.splitlines() if line.startswith("| none | ") and "depth" not in line]
    # Wilson intervals worked by hand: 0/2 -> (0, 0.66), 2/2 -> (0.34, 1), 2/10 -> (0.06, 0.51), 10/10 -> (0.72, 1)
    assert "| none | 0% (0–66), n=2 | 100% (34–100), n=2 | 0% (0–66), n=2 | 0% (0–66), n=2 | 0% (0–66), n=2 |" in rows
    assert rows.count("| none | 20% (6–51), n=10 | 20% (6–51), n=10 |") == 1  # niah_multikey: right at depth 0.25 only
    assert rows.count("| none | 100% (72–100), n=10 | 100% (72–100), n=10 |") == 1  # variable tracking
    csv_lines = (tmp_path / "report" / "ruler.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 2 * (10 + 10)


def test_passkey_report_has_a_table_per_depth(tok, model, tmp_path, monkeypatch):
    monkeypatch.setattr(pk, "generate_answers", lambda m, t, prompts, n, b: [
        decode(t, row).split("pass key #")[1][:5] if decode(t, row).startswith(" pass key") else "00000" for row in prompts])
    pk.passkey(model, tok, [96], ["none"], [0.0, 1.0], trials=3, corpus=_corpus(tmp_path), progress=False,
               run_dir=tmp_path / "run")
    report = write_report(tmp_path / "run").read_text()
    assert "**Exact match per depth** at 96 tokens (3x):" in report
    assert "| none | 100% (44–100), n=3 | 0% (0–56), n=3 |" in report


def _corpus(tmp_path) -> str:
    path = tmp_path / "filler.txt"
    path.write_text("lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 400)
    return str(path)


def test_bad_input_is_refused_before_anything_is_written(tok, model, tmp_path):
    run = tmp_path / "never"
    for kwargs, match in ((dict(tasks=["niah_multikey", "nope"]), "unknown RULER task 'nope'; choose from niah_multikey"),
                          (dict(cases=0), "cases must be an integer >= 1, got 0"),
                          (dict(depths=[0.5, 2]), r"depths must be numbers in \[0, 1\], got \[0.5, 2\]"),
                          (dict(lengths=[300]), "RULER length 300 is too short for niah_multikey: .* take \\d+ tokens"),
                          (dict(lengths=[700], tasks="common_words"), "RULER length 700 is too short for common_words"),
                          (dict(methods=["sliding_window"]), "sliding_window is a perplexity baseline")):
        with pytest.raises(ValueError, match=match):
            R.ruler(model, tok, **{"lengths": [900], **kwargs}, run_dir=run, progress=False)
    assert not run.exists()


def test_cli_runs_and_reports(lab_lm, tmp_path):
    from rope_ext import cli

    run = tmp_path / "cli"
    argv = ["eval", "ruler", "--model", str(lab_lm), "--run-dir", str(run), "--lengths", "700", "--methods", "none",
            "--tasks", "niah_multikey", "--cases", "2", "--threads", "1"]
    assert cli.main(argv) == 0
    assert "niah_multikey at 700 tokens" in (run / "report.md").read_text()
    bad = tmp_path / "bad"
    assert cli.main([*argv[:5], str(bad), *argv[6:8], "--tasks", "niah_multikey,nope"]) == 2 and not bad.exists()


def value_reader(cut: int):
    """A fake lm-eval LM: answers each multi-key question from its prompt when the prompt is shorter
    than ``cut`` characters, else "0"; records (expected answer, generation budget) of each request."""
    from lm_eval.api.model import LM

    class ValueReader(LM):
        def __init__(self) -> None:
            super().__init__()
            self.budgets: list[tuple[str, int]] = []

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for request in requests:
                prompt, kwargs = request.args[0], request.args[1]
                self.budgets.append((request.doc["answer"], kwargs["max_gen_toks"]))
                key = re.search(r"for (\S+) mentioned in the provided text\? ", prompt).group(1)
                value = re.search(rf"for {re.escape(key)} is: (\d+)\.", prompt).group(1)
                out.append(value if len(prompt) < cut else "0")
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return ValueReader()


def test_lm_eval_tasks_give_one_score_per_length(lab_lm, tok):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from rope_ext.eval import lm_eval_tasks

    metadata = {"pretrained": str(lab_lm), "max_length": 800, "ruler_lengths": "700,800", "ruler_cases": 6}
    manager = TaskManager(include_defaults=False, include_path=str(lm_eval_tasks.TASKS_DIR), metadata=metadata)
    fake = value_reader(cut=750)
    out = lm_eval.simple_evaluate(model=fake, tasks=["rope_ext_ruler_niah_multikey"], task_manager=manager, bootstrap_iters=0)
    results = out["results"]["rope_ext_ruler_niah_multikey"]
    samples = out["samples"]["rope_ext_ruler_niah_multikey"]
    assert sorted((s["doc"]["case"], s["doc"]["length"]) for s in samples) == [(c, L) for c in range(6) for L in (700, 800)]
    for L in (700, 800):
        mine = [rt.string_match_all(s["resps"][0][0], s["doc"]["expected"]) for s in samples if s["doc"]["length"] == L]
        assert results[f"score@{L},none"] == pytest.approx(sum(mine) / len(mine))
    assert results["score@700,none"] == 1.0 and results["score@800,none"] == 0.0
    assert all(budget == len(encode(tok, answer)) for answer, budget in fake.budgets)
    prompt = rt.build(tok, "niah_multikey", 800, 0, 1)  # the same questions as rope-ext eval ruler
    doc = next(s["doc"] for s in samples if (s["doc"]["case"], s["doc"]["length"]) == (5, 800))
    assert doc["prompt"] == decode(tok, _full(prompt, prompt.questions[0]))
    assert doc["expected"] == list(prompt.questions[0].expected)
    with pytest.raises(ValueError, match="unknown metadata ruler_case; allowed"):
        TaskManager(include_defaults=False, include_path=str(lm_eval_tasks.TASKS_DIR),
                    metadata={**metadata, "ruler_case": 2}).load(["rope_ext_ruler_niah_multikey"])


@pytest.mark.slow
def test_the_rope_ext_model_runs_a_ruler_task_with_a_small_limit(lab_lm):
    lm_eval = pytest.importorskip("lm_eval")
    import rope_ext.eval  # noqa: F401  (registers the model type and the tasks)

    out = lm_eval.simple_evaluate(model="rope_ext", model_args=f"pretrained={lab_lm},method=yarn,max_length=800",
                                  tasks=["rope_ext_ruler_variable_tracking"], limit=2, bootstrap_iters=0,
                                  metadata={"ruler_lengths": "600,800", "ruler_cases": 1})
    results = out["results"]["rope_ext_ruler_variable_tracking"]
    assert {k.split(",")[0] for k in results if "@" in k and "_stderr" not in k} == {"score@600", "score@800"}
    assert [s["doc"]["length"] for s in out["samples"]["rope_ext_ruler_variable_tracking"]] == [600, 800]
