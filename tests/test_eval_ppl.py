"""Perplexity math: chunked loss, sliding window, summaries, method defaults."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rope_ext.eval.lab import LabConfig, build_model
from rope_ext.eval.ppl import (
    perplexity,
    sliding_nll,
    sliding_spans,
    summarize,
    token_nll,
)
from rope_ext.eval.spec import (
    parse_method_params,
    resolve,
    trained_length,
)
from rope_ext.lengths import parse_length, parse_lengths

import rope_ext
from rope_ext.methods import RopeSpec

T = 16


@pytest.fixture(scope="module")
def model():
    return build_model(LabConfig(context=T, layers=2, hidden=32, heads=2, intermediate=48, seed=1), 259).eval()


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed))


def reference_nll(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=x[None]).logits[0, :-1].float()
    return F.cross_entropy(logits, x[1:], reduction="none")


@pytest.mark.parametrize("method,params", [("none", {}), ("rerope", {"window": 8}), ("yarn", {"factor": 4.0})])
def test_chunked_loss_equals_full_logits_loss(model, method, params):
    x = ids(5 * T + 3)
    with rope_ext.patched(model, method, **params):
        ref = reference_nll(model, x)
        for chunk in (1, 7, 1024):
            assert torch.allclose(token_nll(model, x, chunk_size=chunk)[0], ref, atol=1e-5, rtol=1e-5)


def test_chunked_loss_applies_final_softcap(tiny):
    gemma = tiny("gemma2", attn="eager")
    x = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(token_nll(gemma, x, chunk_size=9)[0], reference_nll(gemma, x), atol=1e-5)


def test_sliding_window_at_or_past_length_equals_plain(model):
    x = ids(3 * T)
    plain = token_nll(model, x)[0]
    for window, stride in ((3 * T, 5), (10 * T, 10 * T - 1)):
        assert torch.equal(sliding_nll(model, x, window, stride), plain)
    recs = perplexity(model, [x], [3 * T], ["none", "sliding_window"],
                      method_params={"sliding_window": {"window": 3 * T, "stride": 4}}, sliding=False, progress=False)
    assert recs[0]["result"]["ppl"] == recs[1]["result"]["ppl"]


def test_sliding_window_scores_each_token_once_with_its_window(model):
    for L, window, stride in ((50, 16, 8), (50, 16, 15), (33, 16, 1), (17, 16, 5), (10, 16, 4)):
        spans = sliding_spans(L, window, stride)
        seen = [t for b, e, first in spans for t in range(first, e)]
        assert seen == list(range(1, L))
        assert all(e - b == min(window, L) and b >= 0 for b, e, _ in spans)
        assert all(first - b >= min(window - stride, first) for b, e, first in spans)
    x = ids(40, seed=2)
    got = sliding_nll(model, x, window=T, stride=4)
    for b, e, first in sliding_spans(40, T, 4):
        assert torch.allclose(got[first - 1:e - 1], reference_nll(model, x[b:e])[first - b - 1:], atol=1e-5)
    for bad in (8, 9, 0):
        with pytest.raises(ValueError, match=rf"stride \({bad}\) must be >= 1 and < window \(8\)"):
            sliding_spans(40, 8, bad)


def test_summary_against_direct_computation():
    nll = torch.rand(2, 63, generator=torch.Generator().manual_seed(0)) * 4
    s = summarize(nll, trained=16, buckets=8)
    assert math.isclose(s["ppl"], math.exp(nll.double().mean()), rel_tol=1e-12)
    assert math.isclose(s["ppl_past"], math.exp(nll[:, 16:].double().mean()), rel_tol=1e-12)
    assert s["tokens_past"] == 2 * 47
    edges = [(b["start"], b["end"]) for b in s["buckets"]]
    assert edges[0][0] == 0 and edges[-1][1] == 63 and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    weighted = sum((e - b) * math.log(x["ppl"]) for (b, e), x in zip(edges, s["buckets"])) / 63
    assert math.isclose(weighted, s["nll"], rel_tol=1e-9)
    assert summarize(nll, trained=100, buckets=4)["ppl_past"] is None


def test_perplexity_records_and_explicit_defaults(model):
    docs = [ids(4 * T, seed=s) for s in range(2)]
    recs = perplexity(model, docs, "1x,4x", "none,pi,leaky_rerope", n_docs=2, progress=False)
    assert [(r["key"]["method"], r["key"]["length"]) for r in recs] == [
        (m, L) for L in (T, 4 * T) for m in ("none", "pi", "leaky_rerope", "sliding_window")]
    by = {(r["key"]["method"], r["key"]["length"]): r for r in recs}
    assert by[("pi", 4 * T)]["key"]["params"] == {"factor": 4.0}
    w = T // 2  # Leaky ReRoPE's k: the farthest distance 4T - 1 maps to at most T - 1
    assert by[("leaky_rerope", 4 * T)]["key"]["params"] == {"window": w, "k": max(2.0, math.ceil(100 * (4 * T - 1 - w) / (T - 1 - w)) / 100)}
    assert by[("sliding_window", 4 * T)]["key"]["params"] == {"window": T, "stride": T // 2}
    ref = torch.cat([reference_nll(model, d) for d in docs]).double().mean()
    assert math.isclose(by[("none", 4 * T)]["result"]["ppl"], math.exp(ref), rel_tol=1e-5)
    with rope_ext.patched(model, "pi", target_length=4 * T):
        ref_pi = torch.cat([reference_nll(model, d) for d in docs]).double().mean()
    assert math.isclose(by[("pi", 4 * T)]["result"]["ppl"], math.exp(ref_pi), rel_tol=1e-5)
    assert rope_ext.current(model) is None


def test_concat_mode_windows_are_consecutive(model):
    doc = ids(100, seed=5)
    recs = perplexity(model, [doc], [T], ["none"], mode="concat", n_docs=3, sliding=False, progress=False)
    ref = torch.cat([reference_nll(model, doc[i * T:(i + 1) * T]) for i in range(3)]).double().mean()
    assert math.isclose(recs[0]["result"]["ppl"], math.exp(ref), rel_tol=1e-5)


def test_length_and_param_parsing():
    assert parse_lengths("1x,2x,16x,300", 128) == [128, 256, 2048, 300]
    assert parse_length("0.5x", 128) == 64
    assert parse_lengths("32k,1x", 128) == [32768, 128]
    for bad in ("0", "1", "0x"):
        with pytest.raises(ValueError, match=f"^length must be at least 2 tokens, got '{bad}'"):
            parse_length(bad, 128, minimum=2)
    for bad in ("-3", "abc", "2y"):
        with pytest.raises(ValueError, match=rf"^length must be tokens \(32768\), k = 1024 tokens \(32k\).*; got '{bad}'"):
            parse_length(bad, 128, minimum=2)
    assert parse_method_params(["rerope.window=32", "yarn.beta_fast=16.5", "pi.logn=true"], ["rerope", "yarn", "pi"]) == {
        "rerope": {"window": 32}, "yarn": {"beta_fast": 16.5}, "pi": {"logn": True}}
    with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
        parse_method_params(["window=3"], ["rerope"])
    spec = RopeSpec(rope_theta=1e4, rotary_dim=16, trained_length=128, head_dim=16, num_heads=4)
    assert resolve("yarn", {"factor": 2.0}, 512, spec) == {"factor": 2.0}
    assert resolve("ntk", {}, 64, spec) == {"factor": 1.0}
    assert resolve("dynamic_ntk", {}, 512, spec) == {}
    group = next(G for G in range(1, 512) if 511 // G + 64 - 64 // G <= 127)  # Self-Extend eq. 3 inside 128
    assert resolve("self_extend", {}, 512, spec) == {"window": 64, "group_size": group} and group == 8


def test_trained_length_prefers_original_max_position_embeddings(model):
    assert trained_length(model.config) == T
    cfg = type(model.config)(max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 1024})
    assert trained_length(cfg) == 1024


def test_records_keep_per_window_sums_that_add_up_to_the_aggregates(model):
    docs = [ids(4 * T, seed=s) for s in range(3)]
    recs = perplexity(model, docs, ["2x", "4x"], ["none", "yarn"], n_docs=3, buckets=5, progress=False)
    for rec in recs:
        res, L = rec["result"], rec["key"]["length"]
        windows = res["documents"]
        assert [d["window"] for d in windows] == [0, 1, 2]
        assert sum(d["tokens"] for d in windows) == res["tokens"] == 3 * (L - 1)
        assert sum(d["tokens_past"] for d in windows) == res["tokens_past"] == 3 * (L - 1 - T)
        for part in ("", "_past", "_within"):
            pooled = math.exp(math.fsum(d["nll_sum" + part] for d in windows) / sum(d["tokens" + part] for d in windows))
            assert pooled == res["ppl" + part]
        for j, b in enumerate(res["buckets"]):
            sums = [d["bucket_nll_sums"][j] for d in windows]
            assert math.exp(math.fsum(sums) / (3 * (b["end"] - b["start"]))) == b["ppl"]
        for d in windows:
            assert math.isclose(d["nll_sum_past"] + d["nll_sum_within"], d["nll_sum"], rel_tol=1e-12)
            assert math.isclose(math.fsum(d["bucket_nll_sums"]), d["nll_sum"], rel_tol=1e-12)
    by = {(r["key"]["method"], r["key"]["length"]): r["result"] for r in recs}
    for i, doc in enumerate(docs):  # each window's sums against a plain forward of that document
        ref = reference_nll(model, doc).double()
        got = by[("none", 4 * T)]["documents"][i]
        assert math.isclose(got["nll_sum"], float(ref.sum()), rel_tol=1e-5)
        assert math.isclose(got["nll_sum_past"], float(ref[T:].sum()), rel_tol=1e-5)
        slid = sliding_nll(model, doc, T, T // 2).double()
        assert math.isclose(by[("sliding_window", 4 * T)]["documents"][i]["nll_sum_past"], float(slid[T:].sum()), rel_tol=1e-5)
