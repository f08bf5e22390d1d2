"""The rope_ext tasks of lm-eval (``rope_ext/eval/tasks/*.yaml``), their offline data, and ``register``,
which ``import rope_ext.eval`` calls so that lm-eval knows the ``rope_ext`` model type and these tasks.
lm-eval calls the builders below through the tasks' ``custom_dataset``, handing them ``model_args``
merged with ``metadata`` as keyword arguments. Nothing is downloaded.

rope_ext_passkey and rope_ext_passkey_classic (generate_until): the "compact" format (``... pass key
#NNNNN. ... What is the pass key? #``; the lab passkey model is trained on it) and the "classic" one of
the papers (for pretrained / instruct models, e.g. SmolLM2), see ``rope_ext.eval.passkey``. Prompts
are built by ``rope_ext.eval.passkey.build_prompt`` with the seeds of ``rope-ext eval passkey``
(``random.Random(f"{seed}:{length}:{depth}:{trial}")``), so both see the same prompts. Metrics:
``exact_match`` and ``digit_acc`` (means over all prompts) and, for each length L requested (in
tokens), ``exact_match@L`` and ``digit_acc@L`` (means over the prompts of length L only), as lm-eval's
RULER tasks report one score per length. A document reports only its own length's keys, which lm-eval
aggregates over the documents that report them (it logs that the metrics were scored on different
numbers of documents: expected here). The per-length metrics are added to the task's metric_list
when the task is built (``PasskeyTask``), from the lengths in the metadata. Metadata keys:
  passkey_lengths  "1x,2x,4x" (default; tokens or multiples of the trained length; a list works too)
  passkey_depths   [0, 0.25, 0.5, 0.75, 1]      passkey_trials  5 per (length, depth)
  passkey_keys     1 (> 1: the multi-key variant) passkey_seed    0
  passkey_corpus   "stdlib" or a local path (the compact format's filler)
Documents are ordered trial, then depth, then length, so that ``limit`` >= the number of lengths
scores every length. The tokenizer and trained length come from ``pretrained`` (from model_args, or
pass it in metadata when the model is not ``rope_ext``). A length longer than the model's max_length
(model_args ``max_length``, else what the method's factor / target_length imply) is refused, as is a
prompt that re-tokenizes (text -> tokens, as lm-eval does) too long to leave room for the answer:
lm-eval would cut the prompt from the left, key and all.

rope_ext_ruler_niah_multikey, rope_ext_ruler_niah_multivalue, rope_ext_ruler_variable_tracking and
rope_ext_ruler_common_words (generate_until; tag ``rope_ext_ruler`` runs all four): the RULER-style
tasks of ``rope_ext.eval.ruler_tasks``, one document per question (its prompt = the shared context +
the question: lm-eval does not reuse the cache as ``rope-ext eval ruler`` does), built with the seeds
of ``rope-ext eval ruler`` so both ask the same questions. Each document generates as many tokens as
its expected answer (``RulerTask``). Metrics: ``score`` (RULER's string match: the fraction of the
expected values in the answer) and ``score@L`` per requested length. Metadata keys: ruler_lengths
("1x,2x,4x" by default), ruler_cases (10 questions per length), ruler_seed (0), ruler_depths (the
multi-key needle depths, [0, 0.25, 0.5, 0.75, 1]). Documents are ordered case, then length.

rope_ext_ppl (loglikelihood_rolling; word_perplexity, byte_perplexity, bits_per_byte): one document
per file of ``ppl_corpus`` ("stdlib" = the held-out split of the standard library's source, or a local
text / .jsonl file or directory, see ``rope_ext.eval.corpus``), ``ppl_split`` ("eval" by default),
documents shorter than ``ppl_min_chars`` characters left out (to score only long documents), each cut
to its first ``ppl_max_chars`` characters when given. lm-eval scores each document in rolling
windows of the model's max_length.

Registration (``register``; lm-eval 0.4.13 reads no plugin entry points and indexes only its own task
directory unless given ``include_path``): the model type goes into lm-eval's model registry through
its public ``register`` (a lazy "module:class" entry, so lm-eval's HF model is imported only when
``rope_ext`` is used). For the tasks, ``TaskManager.__init__`` is wrapped so that a TaskManager built
with ``include_defaults=True`` (the default, and what ``simple_evaluate`` and lm-eval's CLI build)
also indexes ``TASKS_DIR``: it goes after lm-eval's own tasks and before the caller's
``include_path`` (whose tasks may override ours), and is not added twice. This one class attribute is
the only thing patched; ``register`` is idempotent and ``unregister_tasks`` restores the original.
"""
from __future__ import annotations

import functools
import inspect
import random
import re
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.task import ConfigurableTask

from rope_ext.lengths import parse_lengths

from .corpus import load_corpus
from .passkey import build_prompt, filler_stream, get_format, score
from .spec import parse_value, trained_length
from .tokens import decode, encode

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAME = "rope_ext"
MODEL_TARGET = f"{__package__}.lm_eval_model:RopeExtLM"
PASSKEY_METRICS = ("exact_match", "digit_acc")
PASSKEY_KEYS = ("passkey_lengths", "passkey_depths", "passkey_trials", "passkey_keys", "passkey_seed", "passkey_corpus")
# Tokens generated per prompt: the answer's length (compact "NNNNN"; classic " NNNNN", a byte or a
# BPE space token more). The tasks' YAML max_gen_toks must say the same (a test checks it).
GEN_TOKENS = {"compact": 5, "classic": 6}
RULER_KEYS = ("ruler_lengths", "ruler_cases", "ruler_seed", "ruler_depths")
PPL_KEYS = ("ppl_corpus", "ppl_split", "ppl_min_chars", "ppl_max_chars")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def length_metric(metric: str, length: int) -> str:
    """The name of ``metric`` over the prompts of ``length`` tokens: "exact_match@4096"."""
    return f"{metric}@{length}"


def _trained(kwargs: dict[str, Any], task: str = "rope_ext_passkey") -> tuple[str, int]:
    """(pretrained, its trained length) from the task's keyword arguments."""
    from rope_ext import models

    pretrained = kwargs.get("pretrained")
    if not pretrained:
        raise ValueError(f"{task} needs the model's tokenizer: give pretrained=PATH in model_args (or metadata)")
    return str(pretrained), trained_length(models.load_config(str(pretrained)))


def _lengths(kwargs: dict[str, Any], trained: int) -> list[int]:
    return parse_lengths([str(x) for x in _items(kwargs.get("passkey_lengths", "1x,2x,4x"))], trained,
                         "passkey_lengths", minimum=2)


def passkey_lengths(**kwargs: Any) -> list[int]:
    """The passkey lengths in tokens that the metadata's ``passkey_lengths`` asks for, in the order given."""
    _check_keys(kwargs, "passkey_", PASSKEY_KEYS)
    return _lengths(kwargs, _trained(kwargs)[1])


def passkey_docs(fmt: str = "compact", **kwargs: Any) -> list[dict[str, Any]]:
    """The passkey prompts as documents {prompt, key, length, depth, trial, tokens}, ordered trial,
    depth, length (see the module docstring)."""
    _check_keys(kwargs, "passkey_", PASSKEY_KEYS)
    pretrained, trained = _trained(kwargs)
    lengths = _lengths(kwargs, trained)
    tokenizer = load_tokenizer(pretrained)
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
                         f"max_length {limit}: pass max_length={max(lengths)} in model_args")
    filler = filler_stream(tokenizer, style, str(kwargs.get("passkey_corpus", "stdlib")), "eval", max(lengths))
    docs = []
    for t in range(trials):
        for d in depths:
            for L in lengths:
                prompt, key, _ = build_prompt(tokenizer, style, filler, L, d, random.Random(f"{seed}:{L}:{d}:{t}"), n_keys)
                text = decode(tokenizer, prompt)
                docs.append({"prompt": text, "key": key, "length": L, "depth": d, "trial": t,
                             "tokens": int(encode(tokenizer, text).numel())})
    need = max(doc["tokens"] for doc in docs) + GEN_TOKENS[style.name]
    if need > limit:
        raise ValueError(f"the passkey prompts re-tokenize to up to {need - GEN_TOKENS[style.name]} tokens; with the "
                         f"{GEN_TOKENS[style.name]} generated that exceeds the model's max_length {limit}: pass max_length={need} in model_args")
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
    """Exact match and per-digit accuracy of the first run of digits generated (``passkey.score``),
    overall and under the document's own length (``exact_match@L``, ``digit_acc@L``)."""
    scored = score([results[0]], [doc["key"]])
    values = {"exact_match": float(scored["exact"]), "digit_acc": float(scored["digit_acc"])}
    return {**values, **{length_metric(m, doc["length"]): v for m, v in values.items()}}


class PasskeyTask(ConfigurableTask):
    """A passkey task of ``TASKS_DIR`` (its YAML's ``class``): lm-eval's configurable task with
    ``exact_match@L`` / ``digit_acc@L`` (mean, higher is better) added to the YAML's metric_list for
    each length L that the metadata's ``passkey_lengths`` asks for."""

    METRICS: tuple[str, ...] = PASSKEY_METRICS

    @staticmethod
    def lengths(**kwargs: Any) -> list[int]:
        return passkey_lengths(**kwargs)

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        if not config:
            raise ValueError(f"{type(self).__name__} is built by lm-eval from its task YAML in {TASKS_DIR}; it needs that config")
        config = {k: v for k, v in config.items() if k != "class"}
        per_length = [{"metric": length_metric(m, L), "aggregation": "mean", "higher_is_better": True}
                      for L in self.lengths(**(config.get("metadata") or {})) for m in self.METRICS]
        super().__init__(config={**config, "metric_list": [*(config.get("metric_list") or []), *per_length]})


def ruler_lengths(**kwargs: Any) -> list[int]:
    """The RULER lengths in tokens that the metadata's ``ruler_lengths`` asks for, in the order given."""
    _check_keys(kwargs, "ruler_", RULER_KEYS)
    return parse_lengths([str(x) for x in _items(kwargs.get("ruler_lengths", "1x,2x,4x"))], _trained(kwargs, "rope_ext_ruler")[1],
                         "ruler_lengths", minimum=2)


def ruler_docs(task: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The questions of RULER-style ``task`` as documents {prompt, answer, expected, length, depth, case,
    gen_tokens, tokens}, each prompt = its context + the question, ordered case, then length."""
    from .ruler import check_settings, plan
    from .ruler_tasks import DEPTHS, build, questions_per_prompt

    lengths = ruler_lengths(**kwargs)
    pretrained, trained = _trained(kwargs, "rope_ext_ruler")
    depths = _items(kwargs.get("ruler_depths", list(DEPTHS)))
    cases = _int(kwargs, "ruler_cases", 10, 1)
    seed = _int(kwargs, "ruler_seed", 0, 0)
    check_settings([task], cases, depths)
    limit = _max_length(kwargs, trained)
    if max(lengths) > limit:
        raise ValueError(f"RULER length(s) {', '.join(str(L) for L in lengths if L > limit)} exceed the model's "
                         f"max_length {limit}: pass max_length={max(lengths)} in model_args")
    tokenizer = load_tokenizer(pretrained)
    prompts = {(L, trial): build(tokenizer, task, L, seed, trial, depths, asked)
               for L in lengths for trial, asked in plan(task, cases, depths)}
    docs = []
    for case in range(cases):
        trial, j = divmod(case, questions_per_prompt(task, depths))
        for L in lengths:
            prompt = prompts[(L, trial)]
            question = prompt.questions[j]
            text = decode(tokenizer, torch.cat([prompt.context, question.ids]))
            docs.append({"prompt": text, "answer": decode(tokenizer, question.answer), "expected": list(question.expected),
                         "length": L, "depth": question.depth, "case": case, "gen_tokens": int(question.answer.numel()),
                         "tokens": int(encode(tokenizer, text).numel())})
    need = max(doc["tokens"] + doc["gen_tokens"] for doc in docs)
    if need > limit:
        raise ValueError(f"the RULER prompts re-tokenize so that prompt + answer take up to {need} tokens, more than the "
                         f"model's max_length {limit}: pass max_length={need} in model_args")
    return docs


def _ruler_dataset(task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    import datasets

    return {"test": datasets.Dataset.from_list(ruler_docs(task, **kwargs))}


def ruler_niah_multikey_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_ruler_niah_multikey."""
    return _ruler_dataset("niah_multikey", kwargs)


def ruler_niah_multivalue_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_ruler_niah_multivalue."""
    return _ruler_dataset("niah_multivalue", kwargs)


def ruler_variable_tracking_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_ruler_variable_tracking."""
    return _ruler_dataset("variable_tracking", kwargs)


def ruler_common_words_dataset(**kwargs: Any) -> dict[str, Any]:
    """``custom_dataset`` of rope_ext_ruler_common_words."""
    return _ruler_dataset("common_words", kwargs)


def ruler_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """RULER's string match of the answer (``score``) and the same under the document's length (``score@L``)."""
    from .ruler_tasks import string_match_all

    value = string_match_all(results[0], doc["expected"])
    return {"score": value, length_metric("score", doc["length"]): value}


class RulerTask(PasskeyTask):
    """A RULER-style task of ``TASKS_DIR``: ``score@L`` for each length L in the metadata's
    ``ruler_lengths``, and each document generates as many tokens as its expected answer has."""

    METRICS = ("score",)

    @staticmethod
    def lengths(**kwargs: Any) -> list[int]:
        return ruler_lengths(**kwargs)

    def construct_requests(self, doc: dict[str, Any], ctx: Any, **kwargs: Any) -> Any:
        request = super().construct_requests(doc, ctx, **kwargs)
        request.arguments[1]["max_gen_toks"] = doc["gen_tokens"]
        return request


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


def _include_path_with_tasks(include_path: Any) -> Any:
    """``include_path`` with ``TASKS_DIR`` first (``include_path`` itself when it holds TASKS_DIR already)."""
    paths = [] if not include_path else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    if any(Path(p).expanduser().resolve() == TASKS_DIR for p in paths):
        return include_path
    return [str(TASKS_DIR), *paths]


def _indexing_rope_ext_tasks(init: Any) -> Any:
    """``TaskManager.__init__`` that also indexes TASKS_DIR when lm-eval's default tasks are included."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["include_defaults"]:
            bound.arguments["include_path"] = _include_path_with_tasks(bound.arguments["include_path"])
        init(*bound.args, **bound.kwargs)

    __init__.rope_ext_original = init
    return __init__


def register() -> None:
    """Make lm-eval know the ``rope_ext`` model type and the tasks of ``TASKS_DIR`` in this process
    (module docstring). Idempotent; ``import rope_ext.eval`` calls it when lm-eval is importable."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills only an empty registry itself)
    from lm_eval.api.registry import model_registry
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    missing = {"include_path", "include_defaults"} - set(inspect.signature(init).parameters)
    if missing:
        raise ImportError(f"lm-eval's TaskManager takes no {', '.join(sorted(missing))}: this lm-eval version cannot "
                          f"index the rope_ext tasks; rope-ext supports lm-eval 0.4.13")
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    if not hasattr(init, "rope_ext_original"):
        TaskManager.__init__ = _indexing_rope_ext_tasks(init)


def unregister_tasks() -> None:
    """Undo ``register``'s wrapping of ``TaskManager.__init__`` (the model type stays registered)."""
    from lm_eval.tasks import TaskManager

    original = getattr(TaskManager.__init__, "rope_ext_original", None)
    if original is not None:
        TaskManager.__init__ = original
