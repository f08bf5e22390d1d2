"""Streaming perplexity: a document fed one token at a time through the model's KV cache, as
StreamingLLM's ``eval_long_ppl`` (Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks", mit-han-lab/streaming-llm), per token the NLL of the next token, the cache's memory
and the wall time.

Configs (the names used in records and reports), with S = ``sinks`` and W = ``cache_window``:
  * ``dense``: the model as loaded (or with ``method``), its ordinary growing KV cache;
  * ``window``: a cache of the last W tokens (``rope_ext.patch(model, method, sinks=0, cache_window=W)``);
  * ``sinks``: the first S tokens + the last W (``sinks=S, cache_window=W``);
  * ``sliding``: sliding window with re-computation: the NLL of the token after position p from a fresh
    forward over the last S + W tokens (p - S - W + 1 .. p), no cache between tokens: O(S + W) work per
    token. ``recompute_every`` = K measures only predictions made at positions p = 0, K, 2K, ... (the
    record says which); its cache memory is the KV that one recompute builds.
A cached config's query attends to the (at most S + W) kept entries plus itself. Every config may run
under a method (``method="yarn"``, ``method_params={"factor": 2}``): parameters not given are the
method's ``defaults_for`` the longest distance the config attends over (dense: the stream; window:
W + 1; sinks: S + W + 1; sliding: S + W), recorded in the key.

One record per (config, document), appended to the run directory as it finishes: a rerun recomputes
nothing and Ctrl-C loses at most the config in progress. Each record keeps per-bucket values (buckets
of ``bucket`` prediction positions): tokens measured, mean NLL, PPL, cache bytes at the bucket's last
token and their maximum, mean and median ms per token.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

import rope_ext
from rope_ext._compat import cache_kwarg
from rope_ext.facts import rope_spec
from rope_ext.lengths import parse_length
from rope_ext.validate import MAX_COUNT, integer

from .corpus import Corpus
from .ppl import select_windows
from .results import ResultStore, RunDir
from .runner import Cell, loaded_method, model_identity, run_cells
from .spec import resolve, trained_length

CONFIGS = ("dense", "window", "sinks", "sliding")
CACHE_PARAMS = ("sinks", "cache_window")
MIB = float(1 << 20)


@dataclass(frozen=True)
class StreamConfig:
    """One way of streaming: a config name, the method it runs under and the cache it keeps."""

    name: str
    method: str = "none"
    params: tuple[tuple[str, Any], ...] = ()
    sinks: int | None = None
    cache_window: int | None = None
    recompute_every: int = 1

    @property
    def span(self) -> int | None:
        """Tokens a sliding recompute runs over (S + W); None for the cached configs."""
        return self.sinks + self.cache_window if self.name == "sliding" else None

    def patch_params(self) -> dict[str, Any] | None:
        """Keyword arguments of ``rope_ext.patch`` for this config; None = the model as loaded."""
        params = dict(self.params)
        if self.name in ("window", "sinks"):
            params.update(sinks=self.sinks, cache_window=self.cache_window)
        return None if self.method == "none" and not params else params

    def label(self) -> str:
        if self.name == "dense":
            text = "dense"
        elif self.name == "sliding":
            every = f", every {self.recompute_every}" if self.recompute_every > 1 else ""
            text = f"sliding (S+W={self.span}{every})"
        elif self.name == "window":
            text = f"window (W={self.cache_window})"
        else:
            text = f"sinks (S={self.sinks}, W={self.cache_window})"
        if self.method != "none" or self.params:
            shown = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)
            text += f" + {self.method}" + (f"({shown})" if shown else "")
        return text


@dataclass
class Trace:
    """Per measured prediction: its position p (the token at p + 1 is predicted), NLL, the cache's
    bytes after the step and the step's wall time (s)."""

    positions: list[int]
    nll: list[float]
    cache_bytes: list[int]
    seconds: list[float]


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache: keys + values of every layer (numel x element size)."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _next_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[0, -1:].float(), target.view(1)))


@contextlib.contextmanager
def configured(model: torch.nn.Module, config: StreamConfig) -> Iterator[None]:
    """The model with ``config``'s method and cache policy on for the block."""
    params = config.patch_params()
    if params is None:
        yield
        return
    native = loaded_method(model)
    if native is not None:
        raise ValueError(f"this model was trained with {native}; streaming applies only the plain 'dense' and "
                         f"'sliding' configs to it (without --method), not {config.label()!r}")
    try:
        handle = rope_ext.patch(model, config.method, **params)
    except TypeError as err:
        raise ValueError(f"{config.label()}: {err}") from None
    try:
        yield
    finally:
        if rope_ext.current(model) is handle:
            rope_ext.unpatch(model)


@torch.inference_mode()
def stream_trace(model: torch.nn.Module, ids: torch.Tensor, config: StreamConfig, progress: bool = False) -> Trace:
    """Stream the 1-D ``ids`` under ``config`` (batch 1) and return its Trace."""
    ids = ids.reshape(-1).long()
    with configured(model, config):
        return _stream(model, ids, config, progress)


def _stream(model: torch.nn.Module, ids: torch.Tensor, config: StreamConfig, progress: bool) -> Trace:
    """Cached configs: one token per forward through one cache, whatever the (patched) model makes of
    an empty DynamicCache (its own layers, or the policy's). ``sliding``: a fresh forward over the last
    S + W tokens per measured position; its cache (the KV that recompute builds) is dropped after."""
    keyword = cache_kwarg(model)
    positions = list(range(0, ids.numel() - 1, config.recompute_every))
    cache = DynamicCache(config=model.config)
    trace = Trace([], [], [], [])
    bar = tqdm(total=len(positions), desc=config.label(), unit="tok", dynamic_ncols=True, leave=False, disable=not progress)
    for p in positions:
        start = time.perf_counter()
        if config.name == "sliding":
            cache = DynamicCache(config=model.config)
            window = ids[max(0, p + 1 - config.span):p + 1][None]
            out = model(input_ids=window, use_cache=True, logits_to_keep=1, **{keyword: cache})
        else:
            out = model(input_ids=ids[p].view(1, 1), use_cache=True, **{keyword: cache})
        nll = _next_nll(out.logits, ids[p + 1])
        trace.seconds.append(time.perf_counter() - start)
        trace.positions.append(p)
        trace.nll.append(nll)
        trace.cache_bytes.append(cache_bytes(cache))
        bar.update(1)
        if config.name == "sliding" or p % 64 == 0:
            bar.set_postfix_str(f"cache {trace.cache_bytes[-1] / MIB:.2f} MiB")
    bar.close()
    return trace


def _ppl(nll: Sequence[float]) -> float | None:
    return float(torch.exp(torch.tensor(nll, dtype=torch.float64).mean())) if nll else None


def summarize(trace: Trace, n_positions: int, bucket: int) -> dict[str, Any]:
    """Totals and per-bucket values (buckets of ``bucket`` prediction positions over 0..n_positions-1;
    a bucket with no measured token is left out). ``trace.positions`` is ascending."""
    rows = []
    for start in range(0, n_positions, bucket):
        end = min(start + bucket, n_positions)
        idx = range(bisect.bisect_left(trace.positions, start), bisect.bisect_left(trace.positions, end))
        if not idx:
            continue
        nll = [trace.nll[i] for i in idx]
        ms = [1e3 * trace.seconds[i] for i in idx]
        rows.append({"start": start, "end": end, "tokens": len(idx), "nll": sum(nll) / len(nll), "ppl": _ppl(nll),
                     "cache_bytes": trace.cache_bytes[idx[-1]], "cache_bytes_max": max(trace.cache_bytes[i] for i in idx),
                     "ms_per_token": sum(ms) / len(ms), "ms_median": statistics.median(ms)})
    peak = max(trace.cache_bytes)
    return {"ppl": _ppl(trace.nll), "nll": sum(trace.nll) / len(trace.nll), "tokens": len(trace.nll),
            "positions": n_positions, "ppl_last_bucket": rows[-1]["ppl"], "cache_bytes_peak": peak,
            "cache_mib_peak": peak / MIB, "ms_per_token_median": statistics.median(1e3 * s for s in trace.seconds),
            "ms_per_token_mean": 1e3 * sum(trace.seconds) / len(trace.seconds), "buckets": rows}


def check_settings(sinks: int, cache_window: int, n_docs: int, bucket: int, recompute_every: int) -> None:
    """Refuse a negative sink count, an empty window, and counts below 1."""
    integer(sinks, "sinks", minimum=0, maximum=MAX_COUNT)
    integer(cache_window, "cache_window", minimum=1, maximum=MAX_COUNT)
    for label, value in (("n_docs", n_docs), ("bucket", bucket), ("recompute_every", recompute_every)):
        integer(value, label, minimum=1, maximum=MAX_COUNT)


def parse_configs(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated config names, each one of CONFIGS."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"no streaming configs given; choose from: {', '.join(CONFIGS)}")
    for name in names:
        if name not in CONFIGS:
            raise ValueError(f"unknown streaming config {name!r}; choose from: {', '.join(CONFIGS)}")
    return list(dict.fromkeys(names))


def build_configs(model: torch.nn.Module, names: Sequence[str], length: int, sinks: int, cache_window: int,
                  method: str, method_params: dict[str, Any], recompute_every: int) -> list[StreamConfig]:
    """One StreamConfig per name, the method's defaults resolved for the distance the config attends over."""
    spec = rope_spec(model)
    spans = {"dense": length, "window": cache_window + 1, "sinks": sinks + cache_window + 1, "sliding": sinks + cache_window}
    out = []
    for name in names:
        params = resolve(method, method_params, max(2, spans[name]), spec)
        params = tuple(sorted((k, v) for k, v in params.items() if k not in CACHE_PARAMS))
        cache = {"window": (0, cache_window), "sinks": (sinks, cache_window), "sliding": (sinks, cache_window)}.get(name, (None, None))
        out.append(StreamConfig(name, method, params, *cache, recompute_every=recompute_every if name == "sliding" else 1))
    return out


def _documents(data: Any, length: int | str | None, n_docs: int, seed: int, corpus: str | Corpus,
               trained: int) -> tuple[list[torch.Tensor], list[str]]:
    """``n_docs`` token streams of ``length`` tokens: consecutive pieces of the joined corpus (for a
    tokenizer), or the given ids (cut to ``length`` when given)."""
    if isinstance(data, torch.Tensor) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], torch.Tensor)):
        docs = [data] if isinstance(data, torch.Tensor) else list(data)
        docs = [d.reshape(-1).long() for d in docs]
        n = parse_length(length, trained, "length (--tokens)", minimum=2) if length is not None else min(d.numel() for d in docs)
        if n < 2:
            raise ValueError(f"length (tokens) must be at least 2 (one prediction), got a document of {n} token(s)")
        short = [i for i, d in enumerate(docs) if d.numel() < n]
        if short:
            raise ValueError(f"document(s) {short} have fewer than tokens={n} ids")
        return [d[:n] for d in docs], [f"ids[{i}]" for i in range(len(docs))]
    if length is None:
        raise ValueError("length (--tokens, the stream length) is required when streaming text from a corpus")
    n = parse_length(length, trained, "length (--tokens)", minimum=2)
    windows, names = select_windows(data, [n], "concat", n_docs, seed, n, corpus)[n]
    joined = f"the held-out files {names[0]} .. {names[-1]} ({len(names)} files) joined"
    return windows, [f"tokens {i * n}..{(i + 1) * n} of {joined}" for i in range(n_docs)]


def stream_perplexity(model: torch.nn.Module, tokens: Any, configs: str | Sequence[str] = CONFIGS, *,
                      length: int | str | None = None, sinks: int = 4, cache_window: int = 2044, method: str = "none",
                      method_params: dict[str, Any] | None = None, n_docs: int = 1, bucket: int = 256,
                      recompute_every: int = 1, seed: int = 0, corpus: str | Corpus = "stdlib",
                      model_name: str | None = None, run_dir: str | RunDir | None = None, progress: bool = True,
                      record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Stream documents through ``model`` under each config; returns one record per (config, document).

    ``tokens``: token ids (a 1-D tensor = one document, or a list of them; cut to ``length`` when
    given) or a tokenizer (then ``n_docs`` consecutive pieces of ``length`` tokens of the joined
    held-out split of ``corpus``). ``length``: tokens or a multiple of the trained length ("64x").
    ``configs``: names from CONFIGS (module docstring). ``method`` / ``method_params``: the method
    every config runs under and its parameters ({"factor": 2}). ``run_dir``: results.jsonl there is
    resumed and appended to (created only after every input is checked). Each record is {"id", "key":
    {task "stream", model, config, method, params, sinks, cache_window, recompute_every, tokens,
    trained_length, document, sample, bucket}, "result": {ppl, nll, tokens, positions, ppl_last_bucket,
    cache_bytes_peak, cache_mib_peak, ms_per_token_median, ms_per_token_mean, measured, source,
    buckets: [{start, end, tokens, nll, ppl, cache_bytes, cache_bytes_max, ms_per_token, ms_median}]},
    "meta": {seconds, threads, ...}}.
    """
    names = parse_configs(configs)
    check_settings(sinks, cache_window, n_docs, bucket, recompute_every)
    rope_ext.methods.get(method)
    if method_params and not isinstance(method_params, dict):
        raise ValueError(f"method_params must be a dict of {method}'s parameters, got {method_params!r}")
    given = dict(method_params or {})
    clash = sorted(set(given) & set(CACHE_PARAMS))
    if clash:
        raise ValueError(f"give {', '.join(clash)} as stream_perplexity arguments (--sinks / --cache-window), "
                         f"not as method parameters")
    trained = trained_length(model.config)
    docs, sources = _documents(tokens, length, n_docs, seed, corpus, trained)
    n = docs[0].numel()
    plan = build_configs(model, names, n, sinks, cache_window, method, given, recompute_every)
    for config in plan:
        with configured(model, config):
            pass
    run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
    identity = model_identity(model, model_name)
    if run is not None:
        run.write_config({"task": "stream", "model": identity, "tokens": n, "configs": names, "sinks": sinks,
                          "cache_window": cache_window, "method": method, "method_params": given, "n_docs": len(docs),
                          "bucket": bucket, "recompute_every": recompute_every, "seed": seed, "trained_length": trained,
                          "corpus": corpus.describe() if isinstance(corpus, Corpus) else str(corpus), **(record or {})})
        run.write_env(torch.get_num_threads())
    store = run.store if run is not None else ResultStore(None)
    cells = []
    for config in plan:
        for i, (ids, source) in enumerate(zip(docs, sources)):
            key = {"task": "stream", "model": identity, "config": config.name, "label": config.label(),
                   "method": config.method, "params": dict(config.params), "sinks": config.sinks,
                   "cache_window": config.cache_window, "recompute_every": config.recompute_every, "tokens": n,
                   "trained_length": trained, "document": i, "sample": _sample(ids), "bucket": bucket}
            cells.append(Cell(key, f"{config.label()} doc {i}", _bind(model, ids, config, bucket, source, progress)))
    return run_cells(cells, store, desc=f"stream {identity['name']}", progress=progress)


def _sample(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().astype("int64").tobytes()).hexdigest()[:16]


def _bind(model, ids, config, bucket, source, progress):
    def compute() -> dict[str, Any]:
        trace = stream_trace(model, ids, config, progress)
        result = summarize(trace, ids.numel() - 1, bucket)
        every = config.recompute_every
        result["measured"] = ("every prediction" if every == 1 else
                              f"predictions at positions p = 0, {every}, {2 * every}, ... < {ids.numel() - 1}")
        result["source"] = source
        return result
    return compute
