"""Text -> token ids for the harness: the lab's byte-level tokenizer, and any HF tokenizer."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

BYTE_OFFSET = 3  # ByT5's ids: pad 0, eos 1, unk 2, then the 256 bytes
SPECIALS = ("<pad>", "</s>", "<unk>")
PROBE = "A\u00e9\u20ac\U0001f600"  # 1-, 2-, 3- and 4-byte UTF-8


def byte_symbols() -> list[str]:
    """The printable symbol of each byte 0..255 in the byte-level BPE alphabet (GPT-2, Radford et al.
    2019, openai/gpt-2 encoder.py ``bytes_to_unicode``; what tokenizers' ByteLevel pre-tokenizer
    writes): printable Latin-1 bytes stand for themselves, the other 68 for chr(256 + n) in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [table[b] for b in range(256)]


def byte_tokenizer() -> Any:
    """The lab's tokenizer: ByT5's vocabulary (<pad> 0, </s> 1, <unk> 2, byte b -> b + 3) as a plain
    transformers fast tokenizer, built offline. Unlike ByT5Tokenizer it adds no special tokens:
    ``tok(prompt)`` is the prompt's bytes with no EOS after them, so ``model.generate(**tok(prompt,
    return_tensors="pt"))`` continues the prompt; text such as "</s>" is bytes too
    (``split_special_tokens``), as the lab trains on it. It saves as ``TokenizersBackend``
    (tokenizer.json + tokenizer_config.json), which ``AutoTokenizer`` loads without repository code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{s: b + BYTE_OFFSET for b, s in enumerate(byte_symbols())}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    pad, eos, unk = SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, eos_token=eos, unk_token=unk, split_special_tokens=True)


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """Whether the ids are UTF-8 bytes + 3 in a vocabulary of 259: ``byte_tokenizer()``, or the
    ByT5Tokenizer that lab checkpoints saved before it still reload with."""
    if len(tokenizer) != 256 + BYTE_OFFSET:
        return False
    return tokenizer(PROBE, add_special_tokens=False)["input_ids"] == [b + BYTE_OFFSET for b in PROBE.encode("utf-8")]


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text`` without special tokens. The byte tokenizer takes a vectorised
    path equal to ``tokenizer(text, add_special_tokens=False)`` (its ids are UTF-8 bytes + 3)."""
    if is_byte_tokenizer(tokenizer):
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        return torch.from_numpy(data)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def decode(tokenizer: Any, ids: Any) -> str:
    """Text of ``ids`` without special tokens. For the byte tokenizer: the bytes' UTF-8 text with
    incomplete or invalid sequences dropped (as ByT5Tokenizer decodes), whichever class it is."""
    if is_byte_tokenizer(tokenizer):
        data = bytes(int(i) - BYTE_OFFSET for i in ids if int(i) >= BYTE_OFFSET)
        return data.decode("utf-8", errors="ignore")
    return tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
