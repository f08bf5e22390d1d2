"""Training data: local text files, directories and JSON Lines, tokenised once (cached on disk) and
packed into sequences of the target length, in a fixed, resumable order.

Documents are concatenated as the tokenizer frames them (its BOS/EOS, an EOS appended when it adds
none) and cut into consecutive sequences of exactly ``length`` tokens, as LongLoRA's fine-tune.py
does with RedPajama: no padding, so S2-Attn applies to every batch. The cache key covers the
tokenizer, the files with their sizes and modification times, and the reading options.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

CACHE_VERSION = 1
PIECE_CHARS = 1 << 20  # long texts are tokenised in pieces of about this many characters, cut at newlines


def collect_files(paths: Sequence[str], extensions: Sequence[str]) -> list[Path]:
    """The files named, plus those under named directories whose suffix is in ``extensions``
    (sorted, hidden entries skipped). A missing path or an empty result is an error."""
    files: list[Path] = []
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"data not found: {', '.join(missing)}")
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path.resolve())
            continue
        found = sorted(
            p.resolve() for p in path.rglob("*")
            if p.is_file() and p.suffix in extensions and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise ValueError(f"data directory {raw} has no files ending in {', '.join(extensions)}")
        files.extend(found)
    return files


def read_documents(path: Path, text_key: str) -> Iterator[str]:
    """The documents of one file: a JSON Lines file gives one per line (field ``text_key``), any
    other file is one document of UTF-8 text."""
    try:
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8")
            return
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a string field {text_key!r}")
                yield record[text_key]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _pieces(text: str) -> list[str]:
    """Split a long text at newlines into pieces of about PIECE_CHARS (exact for byte-level and
    most BPE tokenizers, which do not merge across a newline)."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.find("\n", start + PIECE_CHARS)
        if cut < 0:
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer puts around a document; EOS is appended when the
    tokenizer adds none, so documents stay separated after packing."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), 0)
    prefix, suffix = framed[:start], framed[start + len(plain):]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in suffix:
        suffix = suffix + [eos]
    return prefix, suffix


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer's vocabulary, rules or special tokens do."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(framing(tokenizer)).encode())
    return h.hexdigest()


def cache_key(tokenizer: Any, files: Sequence[Path], text_key: str) -> str:
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = json.dumps({"v": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "files": stats, "text_key": text_key})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROPE_EXT_CACHE", Path.home() / ".cache" / "rope_ext")) / "tokens"


def tokenize_files(tokenizer: Any, files: Sequence[Path], text_key: str, show_progress: bool = True) -> np.ndarray:
    """All documents of ``files`` tokenised and framed, as one flat array of token ids."""
    prefix, suffix = framing(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    chunks: list[np.ndarray] = []
    for path in tqdm(files, desc="tokenising", unit="file", disable=not show_progress):
        for text in read_documents(path, text_key):
            pieces = tokenizer(_pieces(text), add_special_tokens=False)["input_ids"]
            ids = prefix + [i for piece in pieces for i in piece] + suffix
            chunks.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def load_tokens(tokenizer: Any, files: Sequence[Path], text_key: str, cache_dir: str | Path | None = None,
                show_progress: bool = True) -> tuple[np.ndarray, Path]:
    """Token ids of ``files``, from the cache when the key matches, else tokenised and cached
    (written atomically, so concurrent processes never read half a file)."""
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    path = directory / f"{cache_key(tokenizer, files, text_key)}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r"), path
    ids = tokenize_files(tokenizer, files, text_key, show_progress)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r"), path


class PackedSequences:
    """Consecutive, non-overlapping windows of ``length`` tokens over the flat token array."""

    def __init__(self, ids: np.ndarray, length: int):
        if len(ids) < length:
            raise ValueError(f"the data has {len(ids)} tokens, fewer than one sequence of target_length={length}; add data")
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return len(self.ids) // self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.length
        return torch.from_numpy(np.asarray(self.ids[start:start + self.length], dtype=np.int64))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])


class SampleOrder:
    """Sample number i -> sequence index: a fresh seeded permutation every epoch, so any position
    of the stream is known without replaying it (what makes --resume follow the same order)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, np.arange(0)

    def __call__(self, number: int) -> int:
        epoch, offset = divmod(number, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator).numpy()
        return int(self._perm[offset])


def batch_numbers(step: int, micro: int, grad_accum: int, rank: int, world: int, batch_size: int) -> list[int]:
    """The stream positions of one micro-batch: optimizer step ``step``, micro-batch ``micro`` of
    ``grad_accum``, process ``rank`` of ``world``."""
    first = ((step * grad_accum + micro) * world + rank) * batch_size
    return list(range(first, first + batch_size))
