"""Streaming evaluation (``rope-ext eval stream``): the streamed NLL against one full forward and an
explicit recompute, the cache's memory against a count of what it must hold, resume, bad input, and
the report's plots."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

import rope_ext.eval.stream as stream
from rope_ext.cli import main
from rope_ext.eval.lab import LabConfig, build_model, save_lab
from rope_ext.eval.ppl import token_nll
from rope_ext.eval.report import write_report
from rope_ext.eval.stream import StreamConfig, stream_perplexity, stream_trace
from rope_ext.eval.tokens import byte_tokenizer

N = 72  # stream length (the tiny models are trained at 32)
ATOL = 1e-4  # fp32: one token at a time through a cache vs one full forward


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 97, (N,), generator=torch.Generator().manual_seed(0))


def per_token_bytes(model) -> int:
    """Keys + values of one token over every layer, from the config (fp32)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4


def test_dense_stream_equals_one_full_forward(model, ids):
    trace = stream_trace(model, ids, StreamConfig("dense"))
    full = token_nll(model, ids[None])[0]
    assert trace.positions == list(range(N - 1))
    torch.testing.assert_close(torch.tensor(trace.nll), full, atol=ATOL, rtol=0)
    assert trace.cache_bytes == [(p + 1) * per_token_bytes(model) for p in range(N - 1)]


@pytest.mark.parametrize("name,sinks", [("window", 0), ("sinks", 2)])
def test_window_and_sinks_wider_than_the_stream_equal_dense(ids, name, sinks):
    model = make_tiny("llama", max_position_embeddings=128)  # patch refuses a cache wider than the positions reached
    dense = torch.tensor(stream_trace(model, ids, StreamConfig("dense")).nll)
    wide = stream_trace(model, ids, StreamConfig(name, sinks=sinks, cache_window=N))
    torch.testing.assert_close(torch.tensor(wide.nll), dense, atol=ATOL, rtol=0)
    narrow = stream_trace(model, ids, StreamConfig(name, sinks=sinks, cache_window=8))
    assert (torch.tensor(narrow.nll) - dense).abs().max() > 1e-3


def test_sinks_memory_is_flat_and_dense_grows_linearly(model, ids):
    records = stream_perplexity(model, ids, ["dense", "sinks"], sinks=2, cache_window=6, bucket=8, progress=False)
    dense, sinks = ({b["end"]: b["cache_bytes"] for b in r["result"]["buckets"]} for r in records)
    unit = per_token_bytes(model)
    assert dense == {end: end * unit for end in dense}
    filled = [v for end, v in sinks.items() if end > 8]
    assert filled and set(filled) == {8 * unit}
    assert max(b["cache_bytes_max"] for b in records[1]["result"]["buckets"]) == 8 * unit


def test_sliding_equals_an_explicit_recompute(model, ids):
    sinks, window, every = 2, 6, 5
    trace = stream_trace(model, ids, StreamConfig("sliding", sinks=sinks, cache_window=window, recompute_every=every))
    assert trace.positions == list(range(0, N - 1, every))
    expected = []
    with torch.no_grad():
        for p in trace.positions:
            context = ids[max(0, p + 1 - sinks - window):p + 1]
            logits = model(context[None], use_cache=False).logits[0, -1]
            expected.append(float(F.cross_entropy(logits[None], ids[p + 1][None])))
    torch.testing.assert_close(torch.tensor(trace.nll), torch.tensor(expected), atol=ATOL, rtol=0)


def test_records_aggregate_the_trace(model, ids):
    rec = stream_perplexity(model, ids, ["sliding"], sinks=1, cache_window=7, bucket=16, recompute_every=3, progress=False)[0]
    trace = stream_trace(model, ids, StreamConfig("sliding", sinks=1, cache_window=7, recompute_every=3))
    res = rec["result"]
    assert res["tokens"] == len(trace.nll) and "p = 0, 3, 6" in res["measured"]
    assert res["nll"] == pytest.approx(sum(trace.nll) / len(trace.nll), abs=ATOL)
    assert [b["tokens"] for b in res["buckets"]] == [len([p for p in range(s, min(s + 16, N - 1)) if p % 3 == 0])
                                                     for s in range(0, N - 1, 16)]
    first = [trace.nll[i] for i, p in enumerate(trace.positions) if p < 16]
    assert res["buckets"][0]["nll"] == pytest.approx(sum(first) / len(first), abs=ATOL)


def test_resume_recomputes_nothing(model, ids, tmp_path, monkeypatch):
    calls = []
    real = stream.stream_trace

    def counted(*args, **kwargs):
        calls.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "stream_trace", counted)
    first = stream_perplexity(model, ids, ["dense", "sinks", "sliding"], sinks=2, cache_window=6, bucket=16,
                              run_dir=tmp_path, progress=False)
    assert calls == ["dense", "sinks", "sliding"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    again = stream_perplexity(model, ids, ["dense", "sinks", "sliding"], sinks=2, cache_window=6, bucket=16,
                              run_dir=tmp_path, progress=False)
    assert calls == ["dense", "sinks", "sliding"]
    assert again == first and (tmp_path / "results.jsonl").read_text().splitlines() == lines
    stream_perplexity(model, ids, ["dense", "window"], sinks=2, cache_window=6, bucket=16, run_dir=tmp_path, progress=False)
    assert calls[3:] == ["window"]


@pytest.mark.parametrize("kwargs,message", [
    ({"length": 1}, r"length \(--tokens\) must be at least 2 tokens, got 1"), ({"sinks": -1}, "sinks must be an integer >= 0, got -1"),
    ({"cache_window": 0}, "cache_window must be an integer >= 1, got 0"),
    ({"configs": ["dense", "streaming"]}, "unknown streaming config 'streaming'; choose from: dense"),
    ({"recompute_every": 0}, "recompute_every must be an integer >= 1, got 0"),
    ({"method": "nonesuch"}, "unknown method 'nonesuch'; registered methods"),
    ({"method_params": {"sinks": 2}}, "give sinks as stream_perplexity arguments"),
])
def test_bad_input_fails_before_anything_is_written(model, ids, tmp_path, kwargs, message):
    args = {"configs": ["dense", "sinks"], **kwargs}
    with pytest.raises(ValueError, match=message):
        stream_perplexity(model, ids, run_dir=tmp_path / "run", progress=False, **args)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"length \(tokens\) must be at least 2 \(one prediction\), got a document of 1 token"):
        stream_perplexity(model, ids[:1], ["dense"], run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_report_has_the_table_and_both_plots(model, ids, tmp_path):
    docs = [ids, torch.roll(ids, 5)]
    recs = stream_perplexity(model, docs, ["dense", "window", "sinks", "sliding"], sinks=2, cache_window=6, bucket=16,
                             run_dir=tmp_path, progress=False)
    report = write_report(tmp_path).read_text()
    assert "## Streaming perplexity" in report
    dense = [r["result"] for r in recs if r["key"]["config"] == "dense"]
    pooled = torch.tensor(sum(r["nll"] * r["tokens"] for r in dense) / sum(r["tokens"] for r in dense)).exp()
    row = report.split(f"| dense | 2 | {float(pooled):.2f} (")[1]
    low, high = (float(x) for x in row.split(")")[0].split("–"))
    each = sorted(r["ppl"] for r in dense)  # a bootstrap over 2 documents spans from one document's PPL to the other's
    assert (low, high) == (pytest.approx(each[0], abs=0.006), pytest.approx(each[1], abs=0.006))
    assert "| sinks (S=2, W=6) | 2 |" in report and "| sliding (S+W=8) | 2 |" in report
    assert list((tmp_path / "report").glob("stream_ppl_*.png")) and list((tmp_path / "report").glob("stream_cache_*.png"))
    assert "sinks / sliding" in report and "paired by document, n=2" in report


def test_cli_stream_runs_from_the_corpus_and_resumes(tmp_path, capsys):
    lab = build_model(LabConfig(context=16, layers=1, hidden=32, heads=2, intermediate=32), 259).eval()
    path = save_lab(lab, byte_tokenizer(), tmp_path / "lab", {"kind": "lm"})
    common = ["eval", "stream", "--model", str(path), "--run-dir", str(tmp_path / "run"), "--tokens", "3x", "--sinks", "1",
              "--configs", "dense,sinks", "--bucket", "16", "--threads", "1"]
    argv = [*common, "--cache-window", "7"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["key"]["config"] for r in records] == ["dense", "sinks"]
    assert all(r["key"]["tokens"] == 48 and r["result"]["tokens"] == 47 for r in records)
    assert (tmp_path / "run" / "report.md").is_file()
    assert main(argv) == 0
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 2
    assert main([*common, "--cache-window", "0"]) == 2
    assert "argument --cache-window: must be an integer >= 1, got 0" in capsys.readouterr().err
