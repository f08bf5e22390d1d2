"""rope_ext.eval: the evaluation harness (perplexity past the trained length, passkey retrieval, streaming
perplexity with attention sinks, the train-short lab, resumable JSONL results and reports).

    from rope_ext import eval as rx
    records = rx.perplexity(model, tokenizer, ["1x", "4x", "16x"], ["none", "yarn", "rerope"], run_dir="runs/x")
    rx.passkey(model, tokenizer, ["1x", "4x"], ["none", "rerope"], trials=20, run_dir="runs/x")
    rx.stream_perplexity(model, tokenizer, ["dense", "sinks", "sliding"], length="64x", sinks=4, cache_window=60, run_dir="runs/x")
    rx.write_report("runs/x")

Methods are names + parameter dicts handed to ``rope_ext.patch``; the harness knows nothing else of
them. See each function's docstring.
"""
from .corpus import Corpus, Document, load_corpus
from .lab import LabConfig, cached_pretrain, load_lab, pretrain
from .lab_passkey import PasskeyLabConfig, cached_finetune_passkey, finetune_passkey
from .passkey import passkey
from .ppl import perplexity, sliding_nll, token_nll
from .report import write_report
from .results import ResultStore, RunDir
from .runner import choose_threads, set_threads
from rope_ext.lengths import parse_lengths

from .spec import resolve, trained_length
from .stream import stream_perplexity
from .tokens import byte_tokenizer, encode

__all__ = [
    "Corpus",
    "Document",
    "LabConfig",
    "PasskeyLabConfig",
    "ResultStore",
    "RunDir",
    "byte_tokenizer",
    "cached_finetune_passkey",
    "cached_pretrain",
    "choose_threads",
    "encode",
    "finetune_passkey",
    "load_corpus",
    "load_lab",
    "parse_lengths",
    "passkey",
    "perplexity",
    "pretrain",
    "resolve",
    "set_threads",
    "sliding_nll",
    "stream_perplexity",
    "token_nll",
    "trained_length",
    "write_report",
]
