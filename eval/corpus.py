"""Offline text corpora for the lab and the evaluations.

The default corpus is the Python standard library's own source: every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (``site-packages``, ``dist-packages`` and ``__pycache__`` left
out), sorted by relative POSIX path. A file is held out for evaluation when the first 8 hex digits of
``sha256(relative path)``, read as an integer, fall below ``eval_fraction * 2**32``; every other file
is for training. The split depends only on the path, so it is the same on every machine and a file
never moves between splits when others are added; the two splits never share a file. The exact file
list depends on the Python version, so ``Corpus.fingerprint`` (a hash of paths and sizes) is recorded
with every result.

Any local text can be used instead (``load_corpus(path)``): a ``.txt`` / other text file (one
document), a ``.jsonl`` file (one document per line, from its ``"text"`` field), or a directory (every
text file below it, sorted, split by the same path hash as the standard library).
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".toml", ".cfg", ".yaml", ".yml", ".html", ".tex", ".csv")
SPLITS = ("train", "eval", "all")
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """An ordered list of documents of one split of one source."""

    source: str
    split: str
    documents: tuple[Document, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(f"{doc.name}\0{len(doc.text)}\n".encode())
        return h.hexdigest()[:16]

    @property
    def num_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    def text(self) -> str:
        """All documents joined by a blank line (the training stream and the ``concat`` eval mode)."""
        return DOC_SEPARATOR.join(d.text for d in self.documents)

    def describe(self) -> dict:
        return {"source": self.source, "split": self.split, "documents": len(self.documents),
                "chars": self.num_chars, "fingerprint": self.fingerprint}


def is_eval_path(relative_path: str, eval_fraction: float) -> bool:
    """True when the file at ``relative_path`` (POSIX, relative to the corpus root) is held out."""
    digest = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16)
    return digest < eval_fraction * 2**32


def split_paths(relative_paths: Iterable[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval) relative paths, each sorted."""
    paths = sorted(set(relative_paths))
    held = [p for p in paths if is_eval_path(p, eval_fraction)]
    held_set = set(held)
    return [p for p in paths if p not in held_set], held


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _tree_files(root: Path, suffixes: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the files with ``suffixes`` under ``root``, sorted; skipped and hidden
    directories are pruned, not walked (site-packages alone can hold tens of thousands of files)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        out += [(rel / f).as_posix() for f in files if Path(f).suffix in suffixes and not f.startswith(".")]
    return sorted(out)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _check_split(split: str, eval_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")


def _from_tree(root: Path, source: str, split: str, eval_fraction: float, suffixes: Sequence[str]) -> Corpus:
    train, held = split_paths(_tree_files(root, suffixes), eval_fraction)
    chosen = {"train": train, "eval": held, "all": sorted(train + held)}[split]
    docs = tuple(Document(rel, _read(root / rel)) for rel in chosen)
    return Corpus(source, split, tuple(d for d in docs if d.text.strip()))


def _from_jsonl(path: Path, split: str, eval_fraction: float) -> Corpus:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({err.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}: line {i + 1} has no string field 'text'")
        docs.append(Document(f"{path.name}:{i + 1}", text))
    if split != "all":
        docs = [d for d in docs if is_eval_path(d.name, eval_fraction) == (split == "eval")]
    return Corpus(str(path), split, tuple(d for d in docs if d.text.strip()))


def load_corpus(source: str | Path = "stdlib", split: str = "eval", eval_fraction: float = 0.1) -> Corpus:
    """The documents of ``split`` ("train", "eval" or "all") of ``source``.

    ``source``: "stdlib" (default), a directory, a ``.jsonl`` file, or any other text file. A single
    text file is one document and is never split (its split is "all" whatever is asked). Raises
    FileNotFoundError for a missing path and ValueError for a corpus with no text.
    """
    _check_split(split, eval_fraction)
    if str(source) == "stdlib":
        corpus = _from_tree(stdlib_root(), "stdlib", split, eval_fraction, (".py",))
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"corpus {str(source)!r} not found: give 'stdlib', a directory, a .jsonl file or a text file")
        if path.is_dir():
            corpus = _from_tree(path, str(path), split, eval_fraction, TEXT_SUFFIXES)
        elif path.suffix == ".jsonl":
            corpus = _from_jsonl(path, split, eval_fraction)
        else:
            text = _read(path)
            corpus = Corpus(str(path), "all", (Document(path.name, text),) if text.strip() else ())
    if not corpus.documents:
        raise ValueError(f"corpus {str(source)!r} (split {split!r}) is empty: it holds no non-blank text")
    return corpus
