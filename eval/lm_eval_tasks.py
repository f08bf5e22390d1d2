"""Offline data for the lm-eval tasks shipped in ``rope_ext/eval/tasks/`` (``rope_ext_passkey``,
``rope_ext_ppl``): lm-eval calls these builders through the tasks' ``custom_dataset``, handing them
``--model_args`` merged with ``--metadata`` as keyword arguments. Nothing is downloaded.

rope_ext_passkey and rope_ext_passkey_classic (generate_until; metrics exact_match and digit_acc,
means over prompts): the "compact" format (``... pass key #NNNNN. ... What is the pass key? #``; the lab
passkey model is trained on it) and the "classic" one of the papers (for pretrained / instruct models,
e.g. SmolLM2), see ``rope_ext.eval.passkey``. Prompts are built by ``rope_ext.eval.passkey.build_prompt`` with the seeds of ``rope-ext eval passkey``
(``random.Random(f"{seed}:{length}:{depth}:{trial}")``), so both see the same prompts. Metadata keys:
  passkey_lengths  "1x,2x,4x" (default; tokens or multiples of the trained length; a list works too)
  passkey_depths   [0, 0.25, 0.5, 0.75, 1]      passkey_trials  5 per (length, depth)
  passkey_keys     1 (> 1: the multi-key variant) passkey_seed    0
  passkey_corpus   "stdlib" or a local path (the compact format's filler)
The tokenizer and trained length come from ``pretrained`` (from --model_args, or pass it in
--metadata when the model is not ``rope_ext``). A length longer than the model's max_length (model_args
``max_length``, else what the method's factor / target_length imply) is refused, as is a prompt that
re-tokenizes (text -> tokens, as lm-eval does) too long to leave room for the answer: lm-eval would
cut the prompt from the left, key and all.

rope_ext_ppl (loglikelihood_rolling; word_perplexity, byte_perplexity, bits_per_byte): one document
per file of ``ppl_corpus`` ("stdlib" = the held-out split of the standard library's source, or a local
text / .jsonl file or directory, see ``rope_ext.eval.corpus``), ``ppl_split`` ("eval" by default),
documents shorter than ``ppl_min_chars`` characters left out (to score only long documents), each cut
to its first ``ppl_max_chars`` characters when given. lm-eval scores each document in rolling
windows of the model's max_length.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from rope_ext.lengths import parse_lengths

from .corpus import load_corpus
from .passkey import build_prompt, filler_stream, get_format, score
from .spec import parse_value, trained_length
from .tokens import decode, encode

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PASSKEY_KEYS = ("passkey_lengths", "passkey_depths", "passkey_trials", "passkey_keys", "passkey_seed", "passkey_corpus")
# Tokens generated per prompt: the answer's length (compact "NNNNN"; classic " NNNNN", a byte or a
# BPE space token more). The tasks' YAML max_gen_toks must say the same (a test checks it).
GEN_TOKENS = {"compact": 5, "classic": 6}
PPL_KEYS = ("ppl_corpus", "ppl_split", "ppl_min_chars", "ppl_max_chars")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def task_manager(metadata: dict[str, Any] | None = None, include_path: str | Path | list | None = None) -> Any:
    """An lm-eval TaskManager that knows the rope_ext tasks (and ``include_path``, if given)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], metadata=metadata or {})


def _check_keys(kwargs: dict[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(k for k in kwargs if k.startswith(prefix) and k not in allowed)
    if unknown:
        raise ValueError(f"unknown metadata {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _items(value: Any) -> list[Any]:
    """A list from a list, a number, or a string of items separated by commas, semicolons or spaces."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [parse_value(v) for v in re.split(r"[,;\s]+", value.strip()) if v]
    return [value]


def _int(kwargs: dict[str, Any], name: str, default: int, low: int) -> int:
    value = kwargs.get(name, default)
    value = parse_value(value) if isinstance(value, str) else value
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def load_tokenizer(pretrained: str) -> Any:
    """The tokenizer of a local checkpoint, a .gguf file or a ``rope_ext.models`` alias, offline."""
    from transformers import AutoTokenizer

    from rope_ext import models

    name = str(pretrained)
    path = models.shipped_gguf(name) if name in models.ALIASES else Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if not path.is_dir():
        raise FileNotFoundError(f"model {name!r} not found: give a local checkpoint directory, a .gguf file, or one of "
                                f"{', '.join(models.ALIASES)} (nothing is downloaded)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _max_length(kwargs: dict[str, Any], trained: int) -> int:
    from .lm_eval_model import implied_length, parse_arg

    given = parse_arg(kwargs.get("max_length"))
    if given is not None:
        return int(given)
    return implied_length({k: parse_arg(kwargs.get(k)) for k in ("factor", "target_length")}, trained)


def passkey_docs(fmt: str = "compact", **kwargs: Any) -> list[dict[str, Any]]:
    """The passkey prompts as documents {prompt, key, length, depth, trial, tokens}, trial-major so that
    lm-eval's ``--limit`` still covers every (length, depth) cell (see the module docstring)."""
    from rope_ext import models

    _check_keys(kwargs, "passkey_", PASSKEY_KEYS)
    pretrained = kwargs.get("pretrained")
    if not pretrained:
        raise ValueError("rope_ext_passkey needs the model's tokenizer: give pretrained=PATH in --model_args (or --metadata)")
    tokenizer = load_tokenizer(pretrained)
    trained = trained_length(models.load_config(str(pretrained)))
    lengths = parse_lengths([str(x) for x in _items(kwargs.get("passkey_lengths", "1x,2x,4x"))], trained,
                            "passkey_lengths", minimum=2)
    depths = [float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else d
              for d in _items(kwargs.get("passkey_depths", list(DEFAULT_DEPTHS)))]
    if not depths or any(not isinstance(d, float) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"passkey_depths must be numbers in [0, 1], got {kwargs.get('passkey_depths')!r}")
    trials = _int(kwargs, "passkey_trials", 5, 1)
    n_keys = _int(kwargs, "passkey_keys", 1, 1)
    seed = _int(kwargs, "passkey_seed", 0, 0)
    style = get_format(fmt)
    limit = _max_length(kwargs, trained)
    if max(lengths) > limit:
        raise ValueError(f"passkey length(s) {', '.join(str(L) for L in lengths if L > limit)} exceed the model's "
                         f"max_length {limit}: pass max_length={max(lengths)} in --model_args")
    filler = filler_stream(tokenizer, style, str(kwargs.get("passkey_corpus", "stdlib")), "eval", max(lengths))
    docs = []
    for t in range(trials):
        for L in lengths:
            for d in depths:
                prompt, key, _ = build_prompt(tokenizer, style, filler, L, d, random.Random(f"{seed}:{L}:{d}:{t}"), n_keys)
                text = decode(tokenizer, prompt)
                docs.append({"prompt": text, "key": key, "length": L, "depth": d, "trial": t,
                             "tokens": int(encode(tokenizer, text).numel())})
    need = max(doc["tokens"] for doc in docs) + GEN_TOKENS[style.name]
    if need > limit:
        raise ValueError(f"the passkey prompts re-tokenize to up to {need - GEN_TOKENS[style.name]} tokens; with the "
                         f"{GEN_TOKENS[style.name]} generated that exceeds the model's max_length {limit}: pass max_length={need} in --model_args")
    return docs


def passkey_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_passkey (compact format): {"test": datasets.Dataset}."""
    import datasets

    return {"test": datasets.Dataset.from_list(passkey_docs("compact", **kwargs))}


def passkey_classic_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_passkey_classic (the papers' sentences): {"test": datasets.Dataset}."""
    import datasets

    return {"test": datasets.Dataset.from_list(passkey_docs("classic", **kwargs))}


def passkey_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match and per-digit accuracy of the first run of digits generated (``passkey.score``)."""
    scored = score([results[0]], [doc["key"]])
    return {"exact_match": float(scored["exact"]), "digit_acc": float(scored["digit_acc"])}


def ppl_docs(**kwargs: Any) -> list[dict[str, str]]:
    """Documents {name, text} of ``ppl_corpus`` / ``ppl_split`` with at least ``ppl_min_chars``
    characters, each cut to its first ``ppl_max_chars``."""
    _check_keys(kwargs, "ppl_", PPL_KEYS)
    corpus = load_corpus(str(kwargs.get("ppl_corpus", "stdlib")), split=str(kwargs.get("ppl_split", "eval")))
    shortest = _int(kwargs, "ppl_min_chars", 1, 1)
    cut = None if kwargs.get("ppl_max_chars") is None else _int(kwargs, "ppl_max_chars", 0, 1)
    docs = [{"name": doc.name, "text": doc.text[:cut]} for doc in corpus.documents if len(doc.text) >= shortest]
    if not docs:
        raise ValueError(f"no document of corpus {corpus.source!r} (split {corpus.split!r}) has ppl_min_chars={shortest} characters")
    return docs


def ppl_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_ppl: {"test": datasets.Dataset of ``ppl_docs``}."""
    import datasets

    return {"test": datasets.Dataset.from_list(ppl_docs(**kwargs))}
