"""`rope-ext recommend`: the rule's choice over a grid of factors and flags is what its docstring
says, every recommendation patches a tiny model and forwards at the target length, and --tune picks
the lowest perplexity measured independently, resumes without recomputing, and refuses bad budgets
before creating anything."""
from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TRAINED, make_tiny

import rope_ext
from rope_ext import calc
from rope_ext.calc.recommend import UNTUNED_LIMIT, choose
from rope_ext.commands import recommend
from rope_ext.eval import ppl as ppl_module
from rope_ext.eval.lab import LabConfig, build_model, save_lab
from rope_ext.eval.ppl import select_windows
from rope_ext.eval.tokens import byte_tokenizer
from rope_ext.methods import RopeSpec, registry
from rope_ext.methods.rerope import leaky_rerope_relative
from rope_ext.methods.self_extend import self_extend_relative

FLAGS = list(itertools.product([False, True], repeat=3))  # finetune, serving, attention_methods


def expected(T: int, L0: int, finetune: bool, serving: bool, attention: bool) -> str:
    """The rule of ``choose``'s docstring, written out."""
    if T <= L0:
        return "none"
    if finetune or serving or not attention:
        return "yarn"
    return "leaky_rerope"


@pytest.mark.parametrize("L0", [4, 32, 8192])
@pytest.mark.parametrize("ratio", [1 / 8, 1, 1.01, 2, 2.5, 4, 64])
def test_rule_over_factors_and_flags(L0, ratio):
    T = max(1, round(L0 * ratio))
    spec = RopeSpec(rope_theta=1e4, rotary_dim=64, trained_length=L0, head_dim=64, num_heads=1)
    for finetune, serving, attention in FLAGS:
        c = choose(T, 64, 1e4, L0, finetune=finetune, serving=serving, attention_methods=attention)
        assert c.method == expected(T, L0, finetune, serving, attention)
        assert c.factor == pytest.approx(T / L0)
        if c.method == "none":
            assert c.params == {} and c.runners_up == ()
            continue
        defaults = registry.get(c.method).defaults_for(spec, T)
        assert {k: c.params[k] for k in defaults} == defaults          # the one source of defaults
        if c.method == "yarn":
            assert c.params["factor"] == pytest.approx(T / L0)
        names = [r.method for r in c.runners_up]
        assert names and c.method not in names and len(set(names)) == len(names)
        if not attention:                                              # only what the family runs
            assert all(registry.get(n).rotation == "static" for n in names)
        warned = bool(c.caveats)
        assert warned == (c.method == "yarn" and not finetune and T / L0 > UNTUNED_LIMIT)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="target_length must be at least 1 token, got 0"):
        choose(0, 64, 1e4, 32)
    with pytest.raises(ValueError, match="finetune must be True or False, got 'yes'"):
        choose(64, 64, 1e4, 32, finetune="yes")


def max_distance(method: str, params: dict, T: int) -> float:
    """The largest relative position a method hands the model at length T (independent formulas)."""
    rel = torch.arange(T)
    if method == "leaky_rerope":
        return float(leaky_rerope_relative(rel, params["window"], params["k"]).max())
    if method == "self_extend":
        q, k = rel[:, None], rel[None, :]
        return float(self_extend_relative(q, k, params["group_size"], params["window"])[k <= q].max())
    return T - 1


@pytest.mark.parametrize("model_type", ["llama", "falcon"])
@pytest.mark.parametrize("T", [16, 33, 4 * TRAINED])
def test_every_recommendation_patches_and_forwards_at_the_target(model_type, T):
    model = make_tiny(model_type)
    _, spec = calc.model_rope_spec(model.config)
    attention = rope_ext.patches.FAMILIES[model_type].attention_interface
    ids = torch.randint(3, 97, (1, T))
    seen = set()
    for finetune, serving in itertools.product([False, True], repeat=2):
        c = choose(T, spec.rotary_dim, spec.rope_theta, spec.trained_length, finetune=finetune, serving=serving,
                   attention_methods=attention)
        for method, params in [(c.method, c.params), *((r.method, r.params) for r in c.runners_up)]:
            if (method, str(params)) in seen:
                continue
            seen.add((method, str(params)))
            with torch.no_grad(), rope_ext.patched(model, method, **params) as handle:
                reach = handle.method.context_length
                assert reach is None or reach >= T, (method, reach)
                assert max_distance(method, params, T) <= max(TRAINED, T) - 1
                assert torch.isfinite(model(ids).logits).all()
    methods = {m for m, _ in seen}
    if T <= TRAINED:
        assert methods == {"none"}
    else:
        assert methods == ({"leaky_rerope", "self_extend", "yarn", "pi", "dynamic_ntk"} if attention else {"yarn", "pi"})


# ---- the command ------------------------------------------------------------------------------

LAB_T = 32


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    """An untrained 1-layer lab checkpoint (byte tokenizer), trained length 32."""
    tokenizer = byte_tokenizer()
    cfg = LabConfig(context=LAB_T, layers=1, hidden=32, heads=2, intermediate=64, steps=1, seed=3)
    return save_lab(build_model(cfg, len(tokenizer)), tokenizer, tmp_path_factory.mktemp("lab") / "model", {"config": {}})


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    recommend.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["recommend", *argv])
    return args.func(args)


def run_json(capsys, *argv: str) -> dict:
    assert cli(*argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_command_prints_the_rule_choice(capsys, lab_dir):
    info = run_json(capsys, str(lab_dir), "--target-length", "4x", "--serving")
    assert (info["trained_length"], info["target_length"]) == (LAB_T, 4 * LAB_T)
    assert info["choice"] == choose(4 * LAB_T, 16, 1e4, LAB_T, serving=True).to_dict()
    assert cli(str(lab_dir), "--target-length", "128") == 0
    out = capsys.readouterr().out
    assert "choice: leaky_rerope" in out and "runner-up: self_extend" in out and "rope_ext.patch(model, 'leaky_rerope'" in out


@pytest.mark.parametrize("argv, error, text", [
    (["--target-length", "0"], ValueError, "--target-length must be at least 1 token, got '0'"),
    (["--target-length", "4x", "--budget-tokens", "100"], ValueError, "--budget-tokens applies to --tune only"),
    (["--target-length", "4x", "--docs", "2", "--repair"], ValueError, "--docs, --repair apply to --tune only"),
    (["--target-length", "4x", "--tune"], ValueError, "--tune needs --run-dir"),
    (["--target-length", "4x", "--tune", "--finetune", "--run-dir", "RUN"], ValueError, "leave out one of them"),
])
def test_command_refuses_bad_flags(lab_dir, tmp_path, argv, error, text):
    run = tmp_path / "run"
    with pytest.raises(error, match=text):
        cli(str(lab_dir), *[str(run) if a == "RUN" else a for a in argv])
    assert not run.exists()


def test_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli(str(tmp_path / "nowhere"), "--target-length", "32k")


@pytest.mark.parametrize("flags, text", [
    (["--budget-tokens", "255"], "cannot cover one candidate: each forwards 2 window.* = 256 tokens; give at least 256"),
    (["--target-length", "1x"], "nothing to tune"),
])
def test_tune_refuses_before_creating_the_run_dir(lab_dir, tmp_path, flags, text):
    run = tmp_path / "deep" / "run"
    argv = [str(lab_dir), "--target-length", "4x", "--tune", "--run-dir", str(run), "--docs", "2", *flags]
    with pytest.raises(ValueError, match=text):
        cli(*argv)
    assert not (tmp_path / "deep").exists()


def reference_ppl_past(model, windows: list[torch.Tensor], trained: int) -> float:
    """PPL of the predictions made at positions >= trained, from full logits of a plain forward."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].double()
            loss = F.cross_entropy(logits, w[1:], reduction="none")[trained:]
            nll, n = nll + float(loss.sum()), n + loss.numel()
    return math.exp(nll / n)


@pytest.fixture
def count_forwards(monkeypatch):
    calls = []
    original = ppl_module.token_nll

    def counted(model, input_ids, chunk_size=1024):
        calls.append(int(input_ids.shape[-1]))
        return original(model, input_ids, chunk_size)

    monkeypatch.setattr(ppl_module, "token_nll", counted)
    return calls


def test_tune_picks_the_lowest_measured_ppl_and_resumes(capsys, lab_dir, tmp_path, count_forwards):
    run, T = tmp_path / "run", 4 * LAB_T
    argv = [str(lab_dir), "--target-length", str(T), "--tune", "--run-dir", str(run), "--docs", "2", "--threads", "1"]
    first = run_json(capsys, *argv, "--max-candidates", "2")["tune"]
    assert count_forwards == [T] * 4 and [c["computed_now"] for c in first["candidates"]] == [True, True]
    assert len(first["not_evaluated"]) >= 4
    count_forwards.clear()
    info = run_json(capsys, *argv)
    tuned = info["tune"]
    rows = tuned["candidates"]
    assert [c["computed_now"] for c in rows] == [False, False] + [True] * (len(rows) - 2)
    assert count_forwards == [T] * 2 * (len(rows) - 2) and tuned["not_evaluated"] == []
    assert {c["method"] for c in rows} == {"leaky_rerope", "self_extend", "yarn"}
    assert rows[0]["params"] == info["choice"]["params"] and rows[0]["origin"] == "the rule's choice"

    model, tokenizer = rope_ext.load(lab_dir)
    windows = select_windows(tokenizer, [T], "concat", 2)[T][0]
    reference = []
    for c in rows:
        with rope_ext.patched(model, c["method"], **c["params"]):
            reference.append(reference_ppl_past(model, windows, LAB_T))
    for c, ref in zip(rows, reference):
        assert c["ppl_past"] == pytest.approx(ref, rel=1e-5)
    chosen = next(i for i, c in enumerate(rows) if c["params"] == tuned["choice"]["params"] and c["method"] == tuned["choice"]["method"])
    assert reference[chosen] <= min(reference) * (1 + 1e-6)
    report = (run / "tune.md").read_text()
    assert "not a ranking" in report and f"**{rows[chosen]['method']}(" in report

    count_forwards.clear()
    again = run_json(capsys, *argv)["tune"]
    assert count_forwards == [] and again["choice"] == tuned["choice"]
    assert not any(c["computed_now"] for c in again["candidates"])


def test_interrupted_tune_keeps_finished_candidates(capsys, lab_dir, tmp_path, monkeypatch):
    run, T = tmp_path / "run", 2 * LAB_T
    argv = [str(lab_dir), "--target-length", str(T), "--tune", "--run-dir", str(run), "--docs", "1", "--max-candidates", "3",
            "--threads", "1"]
    original, calls = ppl_module.token_nll, []

    def interrupt_third(model, input_ids, chunk_size=1024):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(model, input_ids, chunk_size)

    monkeypatch.setattr(ppl_module, "token_nll", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        cli(*argv, "--json")
    assert len((run / "results.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(ppl_module, "token_nll", original)
    capsys.readouterr()
    tuned = run_json(capsys, *argv)["tune"]
    assert [c["computed_now"] for c in tuned["candidates"]] == [False, False, True]
    assert "1 window there is no spread" in tuned["why"]
