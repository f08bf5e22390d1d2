"""Perplexity past the trained length, per method and length.

For each (method, length) cell: PPL over the whole window, over only the predictions made at
positions past the trained length (query position p >= trained length; the token at p + 1 is
predicted there), and per position bucket. The sliding-window baseline (method "sliding_window":
windows of the trained length moved by ``stride`` tokens, each token scored once with at least
window - stride tokens of context, as in the Hugging Face perplexity guide) is what ideal
extrapolation is measured against.

Windows (``mode``):
  * "truncate" (YaRN's eval/perplexity.py): documents with at least max(lengths) tokens, each cut to
    its first ``length`` tokens -- every length sees prefixes of the same documents;
  * "concat" (LongLoRA's eval.py): documents joined into one stream, windows of ``length`` tokens
    every ``doc_stride`` tokens (default: ``length``, non-overlapping).
Documents are taken in a seeded order (sha256 of seed and name). The loss is computed in chunks:
the model body gives hidden states, then lm_head + cross-entropy run ``chunk_size`` positions at a
time, so full-vocabulary logits for the whole window never exist at once. Each record keeps, per window,
the NLL sums and token counts behind every aggregate (``summarize``): the report's intervals
(``rope_ext.eval.stats``) resample those windows.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rope_ext.facts import rope_spec
from rope_ext.lengths import parse_lengths
from rope_ext.validate import MAX_COUNT, integer

from .corpus import Corpus, load_corpus
from .results import ResultStore, RunDir
from .runner import Cell, applied, check_methods, model_identity, run_cells
from .spec import SLIDING, parse_methods, resolve, trained_length
from .stats import pooled_ppl
from .tokens import encode

MODES = ("truncate", "concat")


def _logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head on hidden states, with the families' post-processing (Gemma 2 softcap, Granite scale)."""
    logits = model.get_output_embeddings()(hidden).float()
    scaling = getattr(model.config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.inference_mode()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Negative log-likelihood (B, L - 1) of tokens 1..L-1 of ``input_ids`` (B, L), float32:
    entry p is the loss of the prediction made at position p. The body runs once; lm_head and
    cross-entropy run ``chunk_size`` positions at a time."""
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = input_ids[:, 1:]
    out = []
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        logits = _logits(model, hidden[:, start:end])
        out.append(F.cross_entropy(logits.transpose(1, 2), targets[:, start:end], reduction="none"))
    return torch.cat(out, dim=1)


def sliding_spans(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window: targets [first_target, end) are scored in the
    window [begin, end). The first window scores targets 1..window-1; each next one moves by ``stride``
    (< window) and scores the ``stride`` new targets, each with at least window - stride tokens of
    context. Every target 1..length-1 is scored exactly once."""
    if not 1 <= stride < window:
        raise ValueError(f"{SLIDING}: stride ({stride}) must be >= 1 and < window ({window}) so that every token is scored with context")
    end = min(window, length)
    spans = [(0, end, 1)]
    while end < length:
        new_end = min(end + stride, length)
        spans.append((new_end - window, new_end, end))
        end = new_end
    return spans


@torch.inference_mode()
def sliding_nll(model: torch.nn.Module, ids: torch.Tensor, window: int, stride: int, chunk_size: int = 1024,
                batch_size: int = 16) -> torch.Tensor:
    """NLL (L - 1,) of a 1-D token sequence scored with a sliding window of ``window`` tokens moved by
    ``stride`` (windows, all of one size, are batched). With window >= L this is ``token_nll``."""
    out = torch.empty(ids.numel() - 1)
    spans = sliding_spans(ids.numel(), window, stride)
    for i in range(0, len(spans), batch_size):
        part = spans[i:i + batch_size]
        nll = token_nll(model, torch.stack([ids[b:e] for b, e, _ in part]), chunk_size)
        for row, (b, e, first) in zip(nll, part):
            out[first - 1:e - 1] = row[first - b - 1:e - b - 1]
    return out


def summarize(nll: torch.Tensor, trained: int, buckets: int) -> dict[str, Any]:
    """PPL overall, past the trained length (positions p >= trained), within it, and per bucket of
    positions (``buckets`` equal buckets over 0..L-2; the last takes the remainder), plus the same
    per window (row of ``nll``) as NLL sums and token counts under "documents". Every aggregate is
    computed from the windows' sums (exp of their sum over their token count), so they add up."""
    nll = nll.double()
    if nll.ndim == 1:
        nll = nll[None]
    n_pos = nll.shape[1]
    width = max(1, n_pos // buckets)
    edges = list(range(0, n_pos, width))[:buckets] + [n_pos]
    spans = list(zip(edges[:-1], edges[1:]))
    docs = [{"window": i, "nll_sum": float(row.sum()), "tokens": n_pos,
             "nll_sum_past": float(row[trained:].sum()), "tokens_past": int(row[trained:].numel()),
             "nll_sum_within": float(row[:trained].sum()), "tokens_within": int(row[:trained].numel()),
             "bucket_nll_sums": [float(row[s:e].sum()) for s, e in spans]} for i, row in enumerate(nll)]

    def ppl(sums: list[float], tokens: int) -> float | None:
        return pooled_ppl(sums, [tokens]) if tokens else None

    def part(suffix: str) -> float | None:
        return ppl([d["nll_sum" + suffix] for d in docs], sum(d["tokens" + suffix] for d in docs))

    total = sum(d["tokens"] for d in docs)
    return {
        "ppl": part(""), "nll": math.fsum(d["nll_sum"] for d in docs) / total, "tokens": total,
        "ppl_past": part("_past"), "tokens_past": sum(d["tokens_past"] for d in docs), "ppl_within": part("_within"),
        "buckets": [{"start": s, "end": e, "ppl": ppl([d["bucket_nll_sums"][j] for d in docs], (e - s) * len(docs))}
                    for j, (s, e) in enumerate(spans)],
        "documents": docs,
    }


def _ordered(corpus: Corpus, seed: int) -> list:
    return sorted(corpus.documents, key=lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).hexdigest())


def select_windows(data: Any, lengths: Sequence[int], mode: str, n_docs: int, seed: int = 0,
                   doc_stride: int | None = None, corpus: str | Corpus = "stdlib") -> dict[int, tuple[list[torch.Tensor], list[str]]]:
    """{length: (windows, their source names)}. ``data``: a tokenizer (text from ``corpus``, eval
    split), or token ids (a 1-D tensor = one document, or a list of them). ``doc_stride`` (concat
    mode): tokens between window starts, the length itself when None."""
    integer(n_docs, "n_docs", minimum=1, maximum=MAX_COUNT)
    if doc_stride is not None:
        integer(doc_stride, "doc_stride", minimum=1, maximum=MAX_COUNT)
    longest = max(lengths)
    if isinstance(data, torch.Tensor) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], torch.Tensor)):
        docs = [data] if isinstance(data, torch.Tensor) else list(data)
        encoded = [(f"ids[{i}]", d.reshape(-1).long()) for i, d in enumerate(docs)]
    else:
        source = corpus if isinstance(corpus, Corpus) else load_corpus(corpus, split="eval")
        encoded = ((d.name, encode(data, d.text)) for d in _ordered(source, seed))
    if mode == "truncate":
        chosen = []
        for name, ids in encoded:
            if ids.numel() >= longest:
                chosen.append((name, ids[:longest]))
            if len(chosen) == n_docs:
                break
        if len(chosen) < n_docs:
            raise ValueError(f"only {len(chosen)} document(s) have >= {longest} tokens; need {n_docs} "
                             f"(lower --docs or the longest length, or use --mode concat)")
        return {L: ([ids[:L] for _, ids in chosen], [n for n, _ in chosen]) for L in lengths}
    out = {}
    parts, names, total = [], [], 0
    stream = iter(encoded)
    for L in lengths:
        stride = L if doc_stride is None else doc_stride
        need = (n_docs - 1) * stride + L
        while total < need:
            item = next(stream, None)
            if item is None:
                raise ValueError(f"the corpus has {total} tokens; {n_docs} window(s) of {L} every {stride} need {need}")
            parts.append(item[1])
            names.append(item[0])
            total += item[1].numel()
        flat = torch.cat(parts)
        out[L] = ([flat[i * stride:i * stride + L] for i in range(n_docs)], list(names))
    return out


def _sample_hash(windows: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(w.numpy().astype("int64").tobytes() + b"|")
    return h.hexdigest()[:16]


def compute_cell(model: torch.nn.Module, method: str, params: dict[str, Any], windows: list[torch.Tensor],
                 trained: int, buckets: int, chunk_size: int) -> dict[str, Any]:
    """The metrics of one (method, length) cell over its windows."""
    with applied(model, method, params):
        if method == SLIDING:
            nll = torch.stack([sliding_nll(model, w, params["window"], params["stride"], chunk_size) for w in windows])
        else:
            nll = torch.cat([token_nll(model, w[None], chunk_size) for w in windows])
    return summarize(nll, trained, buckets)


def perplexity(model: torch.nn.Module, data: Any, lengths: Sequence[int | str] | str, methods: Sequence[str] | str = ("none",),
               *, method_params: dict[str, dict[str, Any]] | None = None, sliding: bool = True,
               sliding_stride: int | None = None, mode: str = "truncate", n_docs: int = 1, doc_stride: int | None = None,
               seed: int = 0, corpus: str | Corpus = "stdlib", buckets: int = 16, chunk_size: int = 1024,
               model_name: str | None = None, run_dir: str | RunDir | None = None, progress: bool = True,
               record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Perplexity of ``model`` at each length under each method; returns one record per cell.

    ``data``: a tokenizer (then the held-out split of ``corpus`` is used: "stdlib", a directory, a
    .jsonl or a text file) or token ids (a 1-D tensor, or a list of them, one per document).
    ``lengths``: tokens or multiples of the trained length ("4x"), a list or "1x,2x,16x".
    ``methods``: registered method names ("none" = the model as loaded) and/or "sliding_window";
    ``sliding=True`` adds the sliding-window baseline (window = trained length, ``sliding_stride``
    default window // 2). ``method_params``: {"rerope": {"window": 32}} -- defaults (factor from the
    length, windows ...) are filled in per length and recorded (``rope_ext.eval.spec``).
    ``mode``: "truncate" or "concat"; ``n_docs`` windows per cell. ``run_dir``: a directory (or
    RunDir) whose results.jsonl is resumed and appended to (plus config.json with the resolved
    settings and ``record``, e.g. the command line, and env.json); without it nothing is written.
    Each record is {"id", "key": {task, model, method, params, length, trained_length, mode, sample,
    ...}, "result": {ppl, ppl_past, ppl_within, tokens, tokens_past, buckets: [{start, end, ppl}],
    documents: [{window, nll_sum, tokens, nll_sum_past, tokens_past, nll_sum_within, tokens_within,
    bucket_nll_sums}] (one per window: what the report's intervals are computed from), sources},
    "meta": {seconds, ...}}.
    """
    run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
    trained = trained_length(model.config)
    spec = rope_spec(model)
    lengths = parse_lengths(lengths, trained, "lengths", minimum=2)
    names = parse_methods(methods)
    if sliding and SLIDING not in names:
        names.append(SLIDING)
    given = method_params or {}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"method_params for {', '.join(unknown)}, which are not among the methods run: {', '.join(names)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for label, value in (("n_docs", n_docs), ("buckets", buckets), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    runs = {(m, L): resolve(m, given.get(m, {}), L, spec, sliding_stride) for L in lengths for m in names}
    check_methods(model, [(m, p) for (m, _), p in runs.items()])
    for (m, _), p in runs.items():
        if m == SLIDING:
            sliding_spans(2, p["window"], p["stride"])
    windows = select_windows(data, lengths, mode, n_docs, seed, doc_stride, corpus)
    identity = model_identity(model, model_name)
    settings = {"mode": mode, "n_docs": n_docs, "doc_stride": doc_stride, "seed": seed, "buckets": buckets,
                "chunk_size": chunk_size, "sliding": sliding, "sliding_stride": sliding_stride, "trained_length": trained,
                "corpus": corpus.describe() if isinstance(corpus, Corpus) else str(corpus)}
    if run is not None:
        run.write_config({"task": "ppl", "model": identity, "lengths": lengths, "methods": names, "params": {f"{m}@{L}": p for (m, L), p in runs.items()},
                          "settings": settings, **(record or {})})
        run.write_env(torch.get_num_threads())
    store = run.store if run is not None else ResultStore(None)
    cells = []
    for L in lengths:
        wins, sources = windows[L]
        sample = _sample_hash(wins)
        for m in names:
            params = runs[(m, L)]
            key = {"task": "ppl", "model": identity, "method": m, "params": params, "length": L,
                   "trained_length": trained, "mode": mode, "n_docs": n_docs, "doc_stride": doc_stride,
                   "seed": seed, "sample": sample, "buckets": buckets}
            cells.append(Cell(key, f"{m} @ {L}", _bind(model, m, params, wins, trained, buckets, chunk_size, sources)))
    return run_cells(cells, store, desc=f"ppl {identity['name']}", progress=progress)


def _bind(model, method, params, windows, trained, buckets, chunk_size, sources):
    def compute() -> dict[str, Any]:
        result = compute_cell(model, method, params, windows, trained, buckets, chunk_size)
        result["sources"] = sources
        return result
    return compute

