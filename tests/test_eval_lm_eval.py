"""lm-eval integration: the ``rope_ext`` model type equals rope_ext.patch applied by hand, and the
shipped tasks (passkey, perplexity) run offline end to end on a tiny lab model."""
from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from rope_ext.eval import lm_eval_cli, lm_eval_tasks, ruler_tasks
from rope_ext.eval.lab import LabConfig, pretrain
from rope_ext.eval.lm_eval_model import RopeExtLM
from rope_ext.eval.tokens import encode

import rope_ext
from rope_ext.commands import lm_eval as lm_eval_command

TINY = {"context": 16, "layers": 1, "hidden": 32, "heads": 2, "intermediate": 32, "steps": 30, "batch": 2, "warmup": 1, "lr": 1e-2}
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT * 60)
    return str(path)


@pytest.fixture(scope="module")
def lab_lm(tmp_path_factory, corpus):
    return str(pretrain(LabConfig(**TINY, corpus=corpus), tmp_path_factory.mktemp("lab") / "lm"))


def reference_loglikelihood(path: str, method: str, params: dict, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation | context) from one plain forward of the model patched by hand."""
    model, _ = rope_ext.load(path)
    if method != "none":
        rope_ext.patch(model, method, **params)
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    n = len(context)
    return float(sum(logp[n - 1 + i, tok] for i, tok in enumerate(continuation)))


@pytest.mark.parametrize("method,model_args,params", [
    ("yarn", {"factor": "4"}, {"factor": 4}),
    ("rerope", {"window": "8", "logn": "true"}, {"window": 8, "logn": True}),
])
def test_loglikelihood_equals_the_model_patched_by_hand(lab_lm, method, model_args, params):
    lm = get_model("rope_ext")(pretrained=lab_lm, method=method, max_length="64", device="cpu", **model_args)
    assert isinstance(lm, RopeExtLM) and lm.max_length == 64 and lm.rope_ext_params == params
    tok = lm.tokenizer
    context, continuation = TEXT[:40], TEXT[40:60]
    got = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)], disable_tqdm=True)[0][0]
    ctx_ids, cont_ids = encode(tok, context).tolist(), encode(tok, continuation).tolist()
    want = reference_loglikelihood(lab_lm, method, params, ctx_ids, cont_ids)
    plain = reference_loglikelihood(lab_lm, "none", {}, ctx_ids, cont_ids)
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(want - plain) > 1e-2  # the method changes the numbers past the trained length (16)

    doc = TEXT[:50]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True)[0]
    doc_ids = encode(tok, doc).tolist()
    assert rolling == pytest.approx(reference_loglikelihood(lab_lm, method, params, [lm.prefix_token_id], doc_ids), abs=1e-4)


def test_max_length_defaults_to_what_the_method_targets(lab_lm):
    assert get_model("rope_ext")(pretrained=lab_lm, method="pi", factor=3, device="cpu").max_length == 48
    lm = get_model("rope_ext")(pretrained=lab_lm, method="ntk", max_length=80, device="cpu")
    assert lm.max_length == 80 and lm.rope_ext_params == {"factor": 80 / 16}
    none = get_model("rope_ext")(pretrained=lab_lm, device="cpu")
    assert none.max_length == 16 and rope_ext.current(none.model) is None


@pytest.mark.parametrize("args,match", [
    ({"method": "bogus"}, r"unknown method 'bogus'; registered methods: .*yarn"),
    ({"method": "yarn", "factor": 2, "windw": 3}, r"unknown parameter\(s\) windw; allowed: .*factor"),
    ({"method": "rerope"}, None),
    ({"method": "none", "peft": "x"}, r"peft .*not supported"),
    ({"method": "none", "max_length": "1x"}, r"max_length must be an integer"),
    ({"method": "none", "dtype": "float8"}, r"dtype must be one of auto, float32"),
])
def test_bad_model_args_are_clear_errors(lab_lm, args, match):
    if match is None:  # rerope's window defaults to half the trained length: accepted
        assert get_model("rope_ext")(pretrained=lab_lm, device="cpu", **args).rope_ext_params == {"window": 8}
        return
    with pytest.raises(ValueError, match=match):
        get_model("rope_ext")(pretrained=lab_lm, device="cpu", **args)


def test_passkey_docs_match_the_harness_prompts(lab_lm, corpus):
    from rope_ext.eval.passkey import FORMATS, build_prompt, filler_stream

    docs = lm_eval_tasks.passkey_docs(pretrained=lab_lm, max_length=128, passkey_lengths="4x,128", passkey_depths=[0, 1],
                                      passkey_trials=2, passkey_corpus=corpus, version=1.0)
    assert [(d["trial"], d["length"], d["depth"]) for d in docs[:4]] == [(0, 64, 0.0), (0, 128, 0.0), (0, 64, 1.0), (0, 128, 1.0)]
    assert len(docs) == 8 and all(d["tokens"] + len(d["key"]) == d["length"] for d in docs)
    _, tok = rope_ext.load(lab_lm)
    filler = filler_stream(tok, FORMATS["compact"], corpus, "eval", 128)
    import random

    ids, key, _ = build_prompt(tok, FORMATS["compact"], filler, 128, 1.0, random.Random("0:128:1.0:1"))
    assert docs[-1]["prompt"].encode() == bytes(int(i) - 3 for i in ids) and docs[-1]["key"] == key
    with pytest.raises(ValueError, match="exceed the model's max_length 64: pass max_length=128"):
        lm_eval_tasks.passkey_docs(pretrained=lab_lm, factor=4, passkey_lengths="4x,8x", passkey_corpus=corpus)
    with pytest.raises(ValueError, match="unknown metadata passkey_length; allowed"):
        lm_eval_tasks.passkey_docs(pretrained=lab_lm, passkey_length="4x")
    assert lm_eval_tasks.passkey_results({"key": "12345", "length": 64}, ["12395 and more"]) == {
        "exact_match": 0.0, "digit_acc": 0.8, "exact_match@64": 0.0, "digit_acc@64": 0.8}
    classic = lm_eval_tasks.passkey_docs("classic", pretrained=lab_lm, max_length=256, passkey_lengths="256", passkey_depths="0.5",
                                         passkey_trials=1)
    assert classic[0]["prompt"].endswith("The pass key is") and classic[0]["tokens"] + 1 + len(classic[0]["key"]) == 256


def test_ppl_docs_select_and_cut_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, size in (("a.txt", 50), ("b.txt", 500), ("c.md", 900)):
        (folder / name).write_text("x" * size)
    docs = lm_eval_tasks.ppl_docs(ppl_corpus=str(folder), ppl_split="all", ppl_min_chars=400, ppl_max_chars="600", version=1.0)
    assert [(d["name"], len(d["text"])) for d in docs] == [("b.txt", 500), ("c.md", 600)]
    with pytest.raises(ValueError, match="ppl_min_chars=1000"):
        lm_eval_tasks.ppl_docs(ppl_corpus=str(folder), ppl_split="all", ppl_min_chars=1000)
    with pytest.raises(ValueError, match="unknown metadata ppl_max; allowed"):
        lm_eval_tasks.ppl_docs(ppl_corpus=str(folder), ppl_max=3)
    with pytest.raises(FileNotFoundError, match="corpus '.*missing' not found"):
        lm_eval_tasks.ppl_docs(ppl_corpus=str(tmp_path / "missing"))


def test_task_configs_generate_exactly_the_answer_length():
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = {p.stem: load_yaml(str(p), resolve_func=False) for p in lm_eval_tasks.TASKS_DIR.glob("*.yaml")}
    ruler = {f"rope_ext_ruler_{task}" for task in ruler_tasks.TASKS}
    assert set(configs) == {"rope_ext_passkey", "rope_ext_passkey_classic", "rope_ext_ppl"} | ruler
    assert configs["rope_ext_passkey"]["generation_kwargs"]["max_gen_toks"] == lm_eval_tasks.GEN_TOKENS["compact"]
    assert configs["rope_ext_passkey_classic"]["generation_kwargs"]["max_gen_toks"] == lm_eval_tasks.GEN_TOKENS["classic"]
    for name in ("rope_ext_passkey", "rope_ext_passkey_classic"):
        assert load_yaml(str(lm_eval_tasks.TASKS_DIR / f"{name}.yaml"))["class"] is lm_eval_tasks.PasskeyTask
        assert [m["metric"] for m in configs[name]["metric_list"]] == list(lm_eval_tasks.PASSKEY_METRICS)
    for name in sorted(ruler):
        assert load_yaml(str(lm_eval_tasks.TASKS_DIR / f"{name}.yaml"))["class"] is lm_eval_tasks.RulerTask
        assert [m["metric"] for m in configs[name]["metric_list"]] == list(lm_eval_tasks.RulerTask.METRICS)
        assert "max_gen_toks" not in configs[name]["generation_kwargs"]


@pytest.mark.slow
def test_passkey_and_ppl_tasks_run_through_simple_evaluate(lab_lm, corpus):
    metadata = {"pretrained": lab_lm, "max_length": 64, "passkey_lengths": "48,64", "passkey_depths": "0.5",
                "passkey_trials": 2, "passkey_corpus": corpus, "ppl_corpus": corpus, "ppl_max_chars": 200}
    out = lm_eval.simple_evaluate(model="rope_ext", model_args={"pretrained": lab_lm, "method": "yarn", "max_length": 64},
                                  tasks=["rope_ext_passkey", "rope_ext_ppl"],
                                  task_manager=TaskManager(include_defaults=False, include_path=str(lm_eval_tasks.TASKS_DIR), metadata=metadata),
                                  limit=3, device="cpu", batch_size=1, bootstrap_iters=0)
    passkey, ppl = out["results"]["rope_ext_passkey"], out["results"]["rope_ext_ppl"]
    assert 0.0 <= passkey["exact_match,none"] <= 1.0 and 0.0 <= passkey["digit_acc,none"] <= 1.0
    assert 0.0 <= passkey["exact_match@48,none"] <= 1.0 and 0.0 <= passkey["digit_acc@64,none"] <= 1.0
    assert [s["doc"]["length"] for s in out["samples"]["rope_ext_passkey"]] == [48, 64, 48]
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["word_perplexity,none"] > 1
    assert math.isfinite(ppl["byte_perplexity,none"]) and 1 < ppl["byte_perplexity,none"] < 259
    assert out["config"]["rope_ext_method"] == "yarn" and out["config"]["rope_ext_params"] == {"factor": 4.0}


@pytest.mark.slow
def test_cli_entry_runs_offline_and_reports_bad_methods(lab_lm, corpus, tmp_path, capsys):
    metadata = json.dumps({"ppl_corpus": corpus, "ppl_max_chars": 120})
    parser = argparse.ArgumentParser()
    lm_eval_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["lm-eval", "--model", "rope_ext", "--model_args", f"pretrained={lab_lm},method=rerope,window=8,max_length=32",
                              "--tasks", "rope_ext_ppl", "--metadata", metadata, "--limit", "1", "--device", "cpu",
                              "--output_path", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert "rope_ext_ppl" in capsys.readouterr().out
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())["results"]["rope_ext_ppl"]
    assert math.isfinite(result["word_perplexity,none"])
    with pytest.raises(ValueError, match="unknown method 'nope2'"):
        lm_eval_cli.main(["--model", "rope_ext", "--model_args", f"pretrained={lab_lm},method=nope2", "--tasks", "rope_ext_ppl",
                          "--limit", "1", "--device", "cpu"])
