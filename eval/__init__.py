"""rope_ext.eval: the evaluation harness (perplexity past the trained length, passkey retrieval, streaming
perplexity with attention sinks, the train-short lab, resumable JSONL results and reports).

    from rope_ext import eval as rx
    records = rx.perplexity(model, tokenizer, ["1x", "4x", "16x"], ["none", "yarn", "rerope"], run_dir="runs/x")
    rx.passkey(model, tokenizer, ["1x", "4x"], ["none", "rerope"], trials=20, run_dir="runs/x")
    rx.ruler(model, tokenizer, ["1x", "4x"], ["none", "yarn"], ["niah_multikey", "variable_tracking"], cases=20, run_dir="runs/x")
    rx.stream_perplexity(model, tokenizer, ["dense", "sinks", "sliding"], length="64x", sinks=4, cache_window=60, run_dir="runs/x")
    rx.write_report("runs/x")

Methods are names + parameter dicts handed to ``rope_ext.patch``; the harness knows nothing else of
them. See each function's docstring.

When lm-eval (the optional ``eval`` extra) is importable, importing this package registers lm-eval's
model type ``rope_ext`` and the tasks rope_ext_passkey, rope_ext_passkey_classic, rope_ext_ppl and the
RULER-style rope_ext_ruler_* (tag rope_ext_ruler)
(``rope_ext.eval.lm_eval_tasks.register``), so ``lm_eval.simple_evaluate(model="rope_ext", ...,
tasks=["rope_ext_passkey"])`` works with no other import.
"""
import logging

from .corpus import Corpus, Document, load_corpus
from .lab import LabConfig, cached_pretrain, load_lab, pretrain
from .lab_passkey import PasskeyLabConfig, cached_finetune_passkey, finetune_passkey
from .passkey import passkey
from .ppl import perplexity, sliding_nll, token_nll
from .report import write_report
from .ruler import ruler
from .results import ResultStore, RunDir
from .runner import choose_threads, set_threads
from rope_ext.lengths import parse_lengths

from .spec import resolve, trained_length
from .stats import Interval, bootstrap_ppl, bootstrap_ratio, separated, wilson
from .stream import stream_perplexity
from .tokens import byte_tokenizer, encode
from .tune import Candidate, Tuned, candidates, plan

__all__ = [
    "Candidate",
    "Corpus",
    "Document",
    "Interval",
    "LabConfig",
    "PasskeyLabConfig",
    "ResultStore",
    "RunDir",
    "Tuned",
    "bootstrap_ppl",
    "bootstrap_ratio",
    "byte_tokenizer",
    "cached_finetune_passkey",
    "cached_pretrain",
    "candidates",
    "choose_threads",
    "encode",
    "finetune_passkey",
    "load_corpus",
    "load_lab",
    "parse_lengths",
    "passkey",
    "perplexity",
    "plan",
    "pretrain",
    "resolve",
    "ruler",
    "separated",
    "set_threads",
    "sliding_nll",
    "stream_perplexity",
    "token_nll",
    "trained_length",
    "wilson",
    "write_report",
]

try:  # lm-eval is an optional extra: without it there is nothing to register
    from .lm_eval_tasks import register as _register_lm_eval

    _register_lm_eval()
except ImportError as _err:
    if _err.name != "lm_eval":
        logging.getLogger(__name__).warning("lm-eval is installed but the rope_ext model and tasks could not be registered with it: %s", _err)
