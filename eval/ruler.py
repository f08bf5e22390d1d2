"""RULER-style tasks (``eval.ruler_tasks``) over methods x lengths, into the resumable results store.

One prompt = one prefill: its context (instruction + haystack) runs once with a KV cache, then each
question continues greedily from a copy of that cache (``copy.deepcopy``; the last question takes the
cache itself), so a prompt's several questions cost one long forward and a short continuation each.
A cell is one prompt of (method, length, task); its record keeps every question as a case
{task, length, case, depth, score, expected, prediction}.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from rope_ext._compat import cache_kwarg
from rope_ext.facts import rope_spec
from rope_ext.lengths import parse_lengths

from .results import ResultStore, RunDir
from .ruler_tasks import DEPTHS, TASKS, Prompt, build, check_task, questions_per_prompt, string_match_all
from .runner import Cell, applied, model_identity, resolve_runs, run_cells
from .spec import parse_methods, trained_length
from .tokens import decode

GENERATOR = 1  # bump when the prompts a seed gives change: stored cells of older prompts are then not reused


@contextlib.contextmanager
def _quiet_length_warning() -> Iterator[None]:
    """Silence transformers' warning about generating past the model's maximum length (the point here)."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.generation.stopping_criteria")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@torch.inference_mode()
def answer_questions(model: torch.nn.Module, tokenizer: Any, prompt: Prompt) -> list[str]:
    """The greedy answer to each question of ``prompt`` (as many tokens as its expected answer), the
    context prefilled once and each question continued from a copy of its cache."""
    keyword = cache_kwarg(model)
    context = prompt.context[None]
    cache = DynamicCache(config=model.config)
    model(input_ids=context, attention_mask=torch.ones_like(context), use_cache=True, logits_to_keep=1, **{keyword: cache})
    texts = []
    with _quiet_length_warning():
        for i, question in enumerate(prompt.questions):
            ids = torch.cat([prompt.context, question.ids])[None]
            past = cache if i == len(prompt.questions) - 1 else copy.deepcopy(cache)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=question.answer.numel(),
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=None, **{keyword: past})
            texts.append(decode(tokenizer, out[0, ids.shape[1]:]))
    return texts


def score_prompt(prompt: Prompt, texts: Sequence[str], task: str, length: int, first_case: int) -> dict[str, Any]:
    """RULER's string_match_all of each answer: {cases: [...], score: their mean}."""
    cases = [{"task": task, "length": length, "case": first_case + j, "depth": q.depth,
              "score": string_match_all(text, q.expected), "expected": list(q.expected), "prediction": text}
             for j, (q, text) in enumerate(zip(prompt.questions, texts))]
    return {"cases": cases, "score": sum(c["score"] for c in cases) / len(cases)}


def plan(task: str, cases: int, depths: Sequence[float]) -> list[tuple[int, int]]:
    """(trial, questions asked) of each prompt for ``cases`` questions of ``task``."""
    per = questions_per_prompt(task, depths)
    return [(t, min(per, cases - t * per)) for t in range(math.ceil(cases / per))]


def check_settings(tasks: Sequence[str] | str, cases: Any, depths: Sequence[float]) -> list[str]:
    """The task names of ``tasks`` (a list or comma-separated); ValueError for a bad task, cases or depth."""
    names = [str(t).strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not names:
        raise ValueError(f"no RULER tasks given; choose from {', '.join(TASKS)}")
    for name in names:
        check_task(name)
    if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
        raise ValueError(f"cases must be an integer >= 1, got {cases!r}")
    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be numbers in [0, 1], got {list(depths)!r}")
    return list(dict.fromkeys(names))


def ruler(model: torch.nn.Module, tokenizer: Any, lengths: Sequence[int | str] | str, methods: Sequence[str] | str = ("none",),
          tasks: Sequence[str] | str = TASKS, *, cases: int = 20, depths: Sequence[float] = DEPTHS, seed: int = 0,
          method_params: dict[str, dict[str, Any]] | None = None, model_name: str | None = None,
          run_dir: str | RunDir | None = None, progress: bool = True,
          record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """RULER-style tasks of ``model`` over lengths x methods: ``cases`` questions per (task, length).

    ``lengths`` as in ``passkey`` (tokens or "4x"; context + question + answer = length).
    ``depths``: the needle depths of niah_multikey (one needle per depth per prompt). Method defaults
    are filled in per length (``rope_ext.eval.spec``). One record per prompt; its result is {cases:
    [{task, length, case, depth, score, expected, prediction}], score}. ``run_dir``: resumed and
    appended to (config.json records the settings and ``record``); every input is checked and every
    prompt built before it is created.
    """
    trained = trained_length(model.config)
    spec = rope_spec(model)
    lengths = parse_lengths(lengths, trained, "lengths", minimum=2)
    names = parse_methods(methods)
    task_names = check_settings(tasks, cases, depths)
    depths = [float(d) for d in depths]
    runs = resolve_runs(model, names, lengths, spec, method_params, "RULER tasks")
    prompts = {(t, L, trial): build(tokenizer, t, L, seed, trial, depths, asked)
               for t in task_names for L in lengths for trial, asked in plan(t, cases, depths)}
    identity = model_identity(model, model_name)
    run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
    if run is not None:
        run.write_config({"task": "ruler", "model": identity, "lengths": lengths, "methods": names,
                          "params": {f"{m}@{L}": p for (m, L), p in runs.items()},
                          "settings": {"tasks": task_names, "cases": cases, "depths": depths, "seed": seed,
                                       "trained_length": trained}, **(record or {})})
        run.write_env(torch.get_num_threads())
    store = run.store if run is not None else ResultStore(None)
    cells = []
    for L in lengths:
        for m in names:
            for t in task_names:
                for trial, asked in plan(t, cases, depths):
                    key = {"task": "ruler", "ruler_task": t, "model": identity, "method": m, "params": runs[(m, L)],
                           "length": L, "trained_length": trained, "trial": trial, "asked": asked, "seed": seed,
                           "depths": depths if t == "niah_multikey" else None, "generator": GENERATOR}
                    first = trial * questions_per_prompt(t, depths)
                    cells.append(Cell(key, f"{m} @ {L} {t} #{trial}",
                                      _bind(model, tokenizer, m, runs[(m, L)], prompts[(t, L, trial)], t, L, first)))
    return run_cells(cells, store, desc=f"ruler {identity['name']}", progress=progress)


def compute_cell(model: torch.nn.Module, tokenizer: Any, method: str, params: dict[str, Any], prompt: Prompt,
                 task: str, length: int, first_case: int) -> dict[str, Any]:
    with applied(model, method, params):
        texts = answer_questions(model, tokenizer, prompt)
    return score_prompt(prompt, texts, task, length, first_case)


def _bind(model, tokenizer, method, params, prompt, task, length, first_case):
    def compute() -> dict[str, Any]:
        return compute_cell(model, tokenizer, method, params, prompt, task, length, first_case)
    return compute
