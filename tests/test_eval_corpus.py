"""Corpus split: disjoint, deterministic, path-only; user corpora; clear errors."""
from __future__ import annotations

import json

import pytest
from rope_ext.eval.corpus import is_eval_path, load_corpus, split_paths
from rope_ext.eval.tokens import byte_tokenizer, encode


def test_stdlib_split_disjoint_and_deterministic():
    train = load_corpus("stdlib", split="train")
    held = load_corpus("stdlib", split="eval")
    train_names = {d.name for d in train.documents}
    held_names = {d.name for d in held.documents}
    assert train_names and held_names
    assert not train_names & held_names
    assert all(not n.startswith(("site-packages", "dist-packages")) for n in train_names | held_names)
    again = load_corpus("stdlib", split="eval")
    assert [d.name for d in again.documents] == [d.name for d in held.documents]
    assert again.fingerprint == held.fingerprint
    assert 0.05 < len(held_names) / (len(held_names) + len(train_names)) < 0.2


def test_split_depends_only_on_the_path():
    paths = [f"pkg/mod_{i}.py" for i in range(400)]
    train, held = split_paths(paths, 0.1)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(paths)
    more_train, more_held = split_paths(paths + [f"other/x_{i}.py" for i in range(100)], 0.1)
    assert set(held) <= set(more_held) and set(train) <= set(more_train)
    assert held == sorted(p for p in paths if is_eval_path(p, 0.1))


def test_user_corpora(tmp_path):
    (tmp_path / "one.txt").write_text("hello world")
    assert load_corpus(tmp_path / "one.txt").text() == "hello world"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    train = load_corpus(tmp_path / "docs.jsonl", split="train")
    held = load_corpus(tmp_path / "docs.jsonl", split="eval", eval_fraction=0.3)
    assert len(load_corpus(tmp_path / "docs.jsonl", split="all").documents) == 60
    assert {d.name for d in train.documents}.isdisjoint({d.name for d in load_corpus(tmp_path / "docs.jsonl", split="eval").documents})
    assert held.documents
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    for i in range(30):
        (tree / "a" / f"f{i}.txt").write_text(f"file {i}")
    all_docs = load_corpus(tree, split="all")
    assert len(all_docs.documents) == 30


def test_empty_and_missing_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"corpus '.*blank\.txt' \(split 'eval'\) is empty"):
        load_corpus(tmp_path / "blank.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match=r"corpus '.*emptydir' \(split 'all'\) is empty"):
        load_corpus(tmp_path / "emptydir", split="all")
    with pytest.raises(FileNotFoundError, match="corpus '.*nope' not found: give 'stdlib', a directory"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="split must be one of train, eval, all, got 'test'"):
        load_corpus("stdlib", split="test")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 has no string field 'text'"):
        load_corpus(tmp_path / "bad.jsonl", split="all")


def test_byte_encoding_matches_byt5():
    tok = byte_tokenizer()
    text = "def f(x):\n    return 'héllo' + \"wörld\" # ✓\n"
    assert encode(tok, text).tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok) == 259
