"""Passkey retrieval (Mohtashami & Jaggi 2023; LongLoRA's passkey_retrieval.py): filler text, a pass
key sentence at a chosen depth, a question at the end; the model's greedy continuation must reproduce
the key's digits exactly.

A prompt of length L is built in tokens so that prompt + answer is exactly L tokens: prefix, filler
with the key sentence inserted at ``depth`` (0 = right after the prefix, 1 = right before the
question), question. The multi-key variant inserts ``n_keys`` labelled keys (the asked one at
``depth``, the others at random depths) and asks for one. Keys and filler offsets come from
``random.Random(f"{seed}:{length}:{depth}:{trial}")``: every method sees the same prompts.

Formats: "compact" (``... pass key #NNNNN. ... What is the pass key? #NNNNN``, filler = held-out
corpus text with "#" replaced by a space, so that it marks only the key; the lab passkey model is
fine-tuned on it) and "classic" (the sentences of the
original papers, repeated filler; for pretrained chat/instruct models).
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rope_ext.facts import rope_spec
from rope_ext.lengths import parse_lengths

from .corpus import Corpus, load_corpus
from .results import ResultStore, RunDir
from .runner import Cell, applied, model_identity, resolve_runs, run_cells
from .spec import parse_methods, trained_length
from .tokens import decode, encode

FILLER_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class PasskeyFormat:
    name: str
    prefix: str
    key: str           # "{label}" and "{key}" are filled in
    question: str
    answer: str        # what follows the question: the key, as the model should produce it
    filler: str        # "corpus" or "repeat"
    single_label: str  # the label used when there is one key
    marker: str = ""   # a character taken out of corpus filler so that it marks only the key


FORMATS = {
    "compact": PasskeyFormat("compact", "", " pass key{label} #{key}. ", " What is the pass key{label}? #", "{key}", "corpus", "", "#"),
    "classic": PasskeyFormat(
        "classic",
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there. ",
        " The pass key{label} is {key}. Remember it. {key} is the pass key{label}. ",
        " What is the pass key{label}? The pass key{label} is", " {key}", "repeat", ""),
}
DIGITS = 5


def get_format(name: str) -> PasskeyFormat:
    if name not in FORMATS:
        raise ValueError(f"fmt (--format, the passkey format) must be one of {', '.join(FORMATS)}, got {name!r}")
    return FORMATS[name]


def filler_stream(tokenizer: Any, fmt: PasskeyFormat, corpus: str | Corpus, split: str, min_tokens: int) -> torch.Tensor:
    """Token ids to cut filler from: the first max(4 * min_tokens, 200k) characters of the corpus split
    joined (format "corpus"; all of it when that is too short), or the sentences repeated."""
    if fmt.filler == "repeat":
        unit = encode(tokenizer, FILLER_SENTENCES)
        return unit.repeat(min_tokens // unit.numel() + 2)
    source = corpus if isinstance(corpus, Corpus) else load_corpus(corpus, split=split)
    text = source.text().replace(fmt.marker, " ") if fmt.marker else source.text()
    ids = encode(tokenizer, text[: max(4 * min_tokens, 200_000)])
    if ids.numel() < min_tokens:
        ids = encode(tokenizer, text)
    if ids.numel() < min_tokens:
        raise ValueError(f"the filler corpus has {ids.numel()} tokens; need at least {min_tokens}")
    return ids


def build_prompt(tokenizer: Any, fmt: PasskeyFormat, filler: torch.Tensor, length: int, depth: float,
                 rng: random.Random, n_keys: int = 1) -> tuple[torch.Tensor, str, torch.Tensor]:
    """(prompt ids, key digits, answer ids) with len(prompt) + len(answer) == length."""
    keys = [str(rng.randint(10 ** (DIGITS - 1), 10 ** DIGITS - 1)) for _ in range(n_keys)]
    labels = [fmt.single_label] if n_keys == 1 else [f" {i + 1}" for i in range(n_keys)]
    asked = rng.randrange(n_keys)
    pieces = [encode(tokenizer, fmt.key.format(label=lab, key=k)) for lab, k in zip(labels, keys)]
    question = encode(tokenizer, fmt.question.format(label=labels[asked]))
    answer = encode(tokenizer, fmt.answer.format(key=keys[asked]))
    prefix = encode(tokenizer, fmt.prefix) if fmt.prefix else torch.empty(0, dtype=torch.long)
    budget = length - prefix.numel() - sum(p.numel() for p in pieces) - question.numel() - answer.numel()
    if budget < 0:
        raise ValueError(f"passkey length {length} is too short: prefix, key(s), question and answer alone take {length - budget} tokens")
    start = rng.randrange(0, filler.numel() - budget + 1)
    fill = filler[start:start + budget]
    depths = [rng.random() for _ in range(n_keys)]
    depths[asked] = depth
    order = sorted(range(n_keys), key=lambda i: (round(depths[i] * budget), i))
    parts, cut = [prefix], 0
    for i in order:
        at = round(depths[i] * budget)
        parts += [fill[cut:at], pieces[i]]
        cut = at
    parts += [fill[cut:], question]
    return torch.cat(parts), keys[asked], answer


def score(generated: Sequence[str], keys: Sequence[str], depth: float | None = None) -> dict[str, Any]:
    """Exact match and per-digit accuracy of the first run of digits the model produced (cut to the
    key's length), and per trial (prompt t of the cell) its outcome: {depth, trial, correct, digits}."""
    exact, digits, predictions, outcomes = 0, 0, [], []
    for trial, (text, key) in enumerate(zip(generated, keys)):
        run = re.search(r"\d+", text)
        got = run.group(0)[: len(key)] if run else ""
        predictions.append(got)
        right = sum(a == b for a, b in zip(got, key))
        outcomes.append({"depth": depth, "trial": trial, "correct": got == key, "digits": right})
        exact += got == key
        digits += right
    n = len(keys)
    return {"exact": exact / n, "digit_acc": digits / (n * DIGITS), "trials": n,
            "keys": list(keys), "predictions": predictions, "outcomes": outcomes}


@torch.inference_mode()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: torch.Tensor, new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (``model.generate``) of equal-length prompts, decoded. transformers'
    warning about generating past the model's maximum length is silenced: that is the point here."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.generation.stopping_criteria")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        return _generate(model, tokenizer, prompts, new_tokens, batch_size)
    finally:
        logger.setLevel(level)


def _generate(model: torch.nn.Module, tokenizer: Any, prompts: torch.Tensor, new_tokens: int, batch_size: int) -> list[str]:
    out = []
    for i in range(0, prompts.shape[0], batch_size):
        batch = prompts[i:i + batch_size]
        gen = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=None)
        out += [decode(tokenizer, row[batch.shape[1]:]) for row in gen]
    return out


def passkey(model: torch.nn.Module, tokenizer: Any, lengths: Sequence[int | str] | str, methods: Sequence[str] | str = ("none",),
            depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), *, trials: int = 10, n_keys: int = 1,
            fmt: str = "compact", method_params: dict[str, dict[str, Any]] | None = None, seed: int = 0,
            corpus: str | Corpus = "stdlib", batch_size: int = 16, model_name: str | None = None,
            run_dir: str | RunDir | None = None, progress: bool = True, record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Passkey retrieval of ``model`` over lengths x depths, ``trials`` prompts per cell, per method.

    ``lengths`` as in ``perplexity`` (tokens or "4x"; prompt + answer = length). ``depths`` in [0, 1].
    ``n_keys`` > 1: the multi-key variant. ``fmt``: "compact" or "classic" (module docstring).
    Method defaults are filled in per length as for perplexity (``rope_ext.eval.spec``). Each record's
    result is {exact, digit_acc, trials, keys, predictions, outcomes: [{depth, trial, correct, digits}]}.
    ``run_dir``: resumed and appended to (config.json records the settings and ``record``; env.json
    the environment).
    """
    run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
    trained = trained_length(model.config)
    spec = rope_spec(model)
    lengths = parse_lengths(lengths, trained, "lengths", minimum=2)
    names = parse_methods(methods)
    style = get_format(fmt)
    depths = list(depths)
    if not depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be numbers in [0, 1], got {depths!r}")
    for label, value in (("trials", trials), ("n_keys", n_keys), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    runs = resolve_runs(model, names, lengths, spec, method_params, "passkey retrieval")
    filler = filler_stream(tokenizer, style, corpus, "eval", max(lengths))
    prompts = {}
    for L in lengths:
        for d in depths:
            built = [build_prompt(tokenizer, style, filler, L, float(d), random.Random(f"{seed}:{L}:{d}:{t}"), n_keys) for t in range(trials)]
            prompts[(L, d)] = built
    identity = model_identity(model, model_name)
    settings = {"depths": depths, "trials": trials, "n_keys": n_keys, "format": style.name, "seed": seed,
                "trained_length": trained, "corpus": _filler_id(style, corpus)}
    if run is not None:
        run.write_config({"task": "passkey", "model": identity, "lengths": lengths, "methods": names, "params": {f"{m}@{L}": p for (m, L), p in runs.items()},
                          "settings": settings, **(record or {})})
        run.write_env(torch.get_num_threads())
    store = run.store if run is not None else ResultStore(None)
    cells = []
    for L in lengths:
        for m in names:
            for d in depths:
                params = runs[(m, L)]
                key = {"task": "passkey", "model": identity, "method": m, "params": params, "length": L,
                       "trained_length": trained, "depth": float(d), "trials": trials, "n_keys": n_keys,
                       "format": style.name, "seed": seed, "filler": _filler_id(style, corpus)}
                cells.append(Cell(key, f"{m} @ {L} depth {d:g}", _bind(model, tokenizer, m, params, prompts[(L, d)], batch_size, float(d))))
    return run_cells(cells, store, desc=f"passkey {identity['name']}", progress=progress)


def _filler_id(style: PasskeyFormat, corpus: str | Corpus) -> str:
    if style.filler == "repeat":
        return "repeat"
    return corpus.fingerprint if isinstance(corpus, Corpus) else str(corpus)


def compute_cell(model: torch.nn.Module, tokenizer: Any, method: str, params: dict[str, Any],
                 built: list[tuple[torch.Tensor, str, torch.Tensor]], batch_size: int, depth: float) -> dict[str, Any]:
    prompts = torch.stack([p for p, _, _ in built])
    new_tokens = max(a.numel() for _, _, a in built)
    with applied(model, method, params):
        texts = generate_answers(model, tokenizer, prompts, new_tokens, batch_size)
    return score(texts, [k for _, k, _ in built], depth)


def _bind(model, tokenizer, method, params, built, batch_size, depth):
    def compute() -> dict[str, Any]:
        return compute_cell(model, tokenizer, method, params, built, batch_size, depth)
    return compute
