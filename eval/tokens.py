"""Text -> token ids for the harness: the lab's byte-level tokenizer, and any HF tokenizer."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

BYTE_OFFSET = 3  # ByT5: pad 0, eos 1, unk 2, then the 256 bytes


def byte_tokenizer() -> Any:
    """transformers' ByT5Tokenizer with no extra ids: vocabulary = 3 specials + 256 bytes, no files."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def is_byte_tokenizer(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ == "ByT5Tokenizer" and len(tokenizer) == 256 + BYTE_OFFSET


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text`` without special tokens. The byte tokenizer takes a vectorised
    path equal to ``tokenizer(text, add_special_tokens=False)`` (ByT5 ids are UTF-8 bytes + 3)."""
    if is_byte_tokenizer(tokenizer):
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        return torch.from_numpy(data)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def decode(tokenizer: Any, ids: Any) -> str:
    return tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
