"""The lab's byte tokenizer: ByT5's ids without ByT5's appended EOS, for a tokenizer built in memory
and for the one a saved lab checkpoint reloads with; generation continues the prompt."""
from __future__ import annotations

import json

import pytest
from conftest import TINY_LAB
import torch
from rope_ext.eval.lab import LabConfig, cached_pretrain, load_lab
from rope_ext.eval.tokens import byte_symbols, byte_tokenizer, decode, encode, is_byte_tokenizer
from tokenizers import pre_tokenizers
from transformers import ByT5Tokenizer

import rope_ext

EOS = 1
# every byte valid UTF-8 can hold: all 1- and 2-byte characters, 3-byte ones of each lead byte, 4-byte ones
TEXT = "".join(map(chr, range(0x800))) + "".join(chr(max(x << 12, 0x800) | 0x41) for x in range(16)) \
    + "".join(map(chr, (0x1F600, 0x40000, 0x80000, 0xC0000, 0x100000)))


def tokenizers_under_test(lab_lm):
    return {"built": byte_tokenizer(), "reloaded": rope_ext.load(lab_lm)[1], "load_lab": load_lab(lab_lm)[1]}


def test_byte_symbols_are_the_byte_level_alphabet():
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    assert all(symbols[b] == chr(b) for b in range(0x21, 0x7F))


def test_ids_are_utf8_bytes_plus_three_as_byt5_gives_them(lab_lm):
    expected = [b + 3 for b in TEXT.encode("utf-8")]
    assert set(TEXT.encode("utf-8")) >= set(range(0x80)) | set(range(0x80, 0xC0)) | set(range(0xC2, 0xF5))
    assert ByT5Tokenizer(extra_ids=0)(TEXT, add_special_tokens=False)["input_ids"] == expected
    for name, tok in tokenizers_under_test(lab_lm).items():
        assert len(tok) == 259 and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2), name
        assert tok(TEXT, add_special_tokens=False)["input_ids"] == expected, name
        assert is_byte_tokenizer(tok) and encode(tok, TEXT).tolist() == expected, name


@pytest.mark.parametrize("prompt", ["def add(a, b):", "caf\u00e9 \U0001f600", "</s> is text here"])
def test_a_prompt_gets_no_eos_for_the_built_and_the_reloaded_tokenizer(lab_lm, prompt):
    assert ByT5Tokenizer(extra_ids=0)(prompt)["input_ids"][-1] == EOS  # the trap this avoids
    for name, tok in tokenizers_under_test(lab_lm).items():
        ids = tok(prompt)["input_ids"]
        assert ids == [b + 3 for b in prompt.encode("utf-8")] == encode(tok, prompt).tolist(), name
        assert EOS not in ids and tok(prompt, return_tensors="pt")["input_ids"].shape == (1, len(prompt.encode("utf-8")))


def test_saved_tokenizer_reloads_as_a_plain_transformers_class(lab_lm):
    config = json.loads((lab_lm / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend" and (lab_lm / "tokenizer.json").is_file()


def test_generate_continues_right_after_the_prompt(lab_lm):
    model, tok = rope_ext.load(lab_lm)
    prompt = "def add(a"
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        first = model(inputs["input_ids"]).logits[0, -1].argmax().item()
    n = len(prompt.encode("utf-8"))
    assert out[0, :n].tolist() == [b + 3 for b in prompt.encode("utf-8")] and EOS not in out[0, :n].tolist()
    assert out.shape[1] > n and out[0, n].item() == first


def test_decode_drops_specials_and_broken_bytes_as_byt5_does(lab_lm):
    ids = [EOS, *(b + 3 for b in "caf\u00e9".encode("utf-8")), 0, 0xC3 + 3, 2]
    expected = ByT5Tokenizer(extra_ids=0).decode(ids, skip_special_tokens=True)
    assert expected == "caf\u00e9"
    for name, tok in tokenizers_under_test(lab_lm).items():
        assert decode(tok, ids) == expected, name


def test_a_checkpoint_cached_with_byt5_is_given_the_new_tokenizer_and_keeps_its_weights(tmp_path, text_corpus):
    cfg = LabConfig(**TINY_LAB, corpus=text_corpus)
    path = cached_pretrain(cfg, tmp_path)
    (path / "tokenizer.json").unlink()
    ByT5Tokenizer(extra_ids=0).save_pretrained(path)
    assert type(rope_ext.load(path)[1]).__name__ == "ByT5Tokenizer"
    assert load_lab(path)[1]("ab")["input_ids"] == [100, 101]
    weights, record = (path / "model.safetensors").read_bytes(), (path / "lab.json").read_text()
    assert cached_pretrain(cfg, tmp_path) == path
    assert (path / "model.safetensors").read_bytes() == weights and (path / "lab.json").read_text() == record
    tok = rope_ext.load(path)[1]
    assert type(tok).__name__ == "TokenizersBackend" and tok("ab")["input_ids"] == [100, 101]
