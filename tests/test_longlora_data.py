"""Fine-tuning data: file collection, JSON Lines, framing and packing, the token cache, the order."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_longlora_helpers import byte_tokenizer

from rope_ext.longlora import data as D


def test_collect_files_takes_named_files_and_matching_files_under_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.jsonl").write_text("")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0")
    (tmp_path / "d" / ".hidden").mkdir()
    (tmp_path / "d" / ".hidden" / "h.txt").write_text("h")
    (tmp_path / "x.py").write_text("x")
    files = D.collect_files([str(tmp_path / "x.py"), str(tmp_path / "d")], (".txt", ".jsonl"))
    assert [f.name for f in files] == ["x.py", "b.txt", "a.jsonl"]
    with pytest.raises(FileNotFoundError, match="data not found: .*nope"):
        D.collect_files([str(tmp_path / "nope")], (".txt",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files ending in .txt"):
        D.collect_files([str(tmp_path / "empty")], (".txt",))


def test_jsonl_documents_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert list(D.read_documents(good, "text")) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*'text'"):
        list(D.read_documents(bad, "text"))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        list(D.read_documents(binary, "text"))


def test_tokens_are_the_documents_framed_with_eos_and_pack_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "PIECE_CHARS", 16)  # long documents are cut into pieces: same tokens
    tok = byte_tokenizer()
    (tmp_path / "a.txt").write_text("first line\nsecond line of the document\nthird\n")
    (tmp_path / "b.txt").write_text("héllo")
    files = D.collect_files([str(tmp_path)], (".txt",))
    ids = D.tokenize_files(tok, files, "text", show_progress=False)
    eos = tok.eos_token_id
    expected = tok((tmp_path / "a.txt").read_text())["input_ids"] + [eos] + tok("héllo")["input_ids"] + [eos]
    assert ids.tolist() == expected and ids.dtype == np.uint16
    packed = D.PackedSequences(ids, 8)
    assert len(packed) == len(ids) // 8
    assert packed.batch([0, 2]).tolist() == [expected[0:8], expected[16:24]]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        D.PackedSequences(ids, len(ids) + 1)


def test_the_cache_is_reused_and_invalidated_by_a_change(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    text = tmp_path / "data" / "a.txt"
    text.parent.mkdir()
    text.write_text("some text to cache")
    files = D.collect_files([str(text)], (".txt",))
    first, path = D.load_tokens(tok, files, "text", tmp_path / "cache", show_progress=False)
    calls = []
    real = D.tokenize_files
    monkeypatch.setattr(D, "tokenize_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, same = D.load_tokens(tok, files, "text", tmp_path / "cache", show_progress=False)
    assert same == path and not calls and np.array_equal(first, again)
    text.write_text("changed text")
    os.utime(text, ns=(1, 2))
    files = D.collect_files([str(text)], (".txt",))
    changed, other = D.load_tokens(tok, files, "text", tmp_path / "cache", show_progress=False)
    assert other != path and calls and changed.tolist()[:-1] == tok("changed text")["input_ids"]


def test_sample_order_is_a_seeded_permutation_per_epoch_and_batches_partition_the_stream():
    order = D.SampleOrder(10, seed=3)
    epochs = [[order(e * 10 + i) for i in range(10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and epochs[0] != epochs[1]
    assert [D.SampleOrder(10, seed=3)(n) for n in range(25, 30)] == [order(n) for n in range(25, 30)]
    seen = [n for step in range(3) for micro in range(2) for rank in range(2) for n in D.batch_numbers(step, micro, 2, rank, 2, 3)]
    assert sorted(seen) == list(range(3 * 2 * 2 * 3))
