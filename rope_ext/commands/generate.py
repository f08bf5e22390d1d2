"""``rope-ext generate``: stream a long generation from a patched model, one token at a time, with a
progress bar of tokens/s and KV-cache MiB (flat with ``--sinks`` / ``--cache-window``).

    rope-ext generate --model smollm2 --prompt "def main():" --max-new-tokens 20000 \\
        --method yarn --param factor=2 --sinks 4 --cache-window 2044
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from rope_ext.validate import COUNT, NON_NEGATIVE, SEED, WORKERS, flag, number

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream a generation with tokens/s and cache size", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file, or smollm2")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", required=True, help="tokens to generate (e.g. 20000 or 20k)")
    p.add_argument("--method", default="none", help="a registered method (default none: plain RoPE)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (repeatable)")
    p.add_argument("--sinks", type=NON_NEGATIVE, default=None, help="attention sinks kept at the start of the cache (StreamingLLM)")
    p.add_argument("--cache-window", type=COUNT, default=None, help="most recent tokens kept in the cache")
    p.add_argument("--temperature", type=flag(number, at_least=0, at_most=100), default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=WORKERS, default=None, help="torch CPU threads (default: as rope-ext eval)")
    p.add_argument("--quiet-text", action="store_true", help="do not print the generated text")
    p.set_defaults(func=run)


def parse_params(items: list[str]) -> dict[str, Any]:
    from rope_ext.eval.spec import parse_value

    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--param {item!r} must look like NAME=VALUE, e.g. factor=2")
        params[name.strip()] = parse_value(value)
    return params


def cache_mib(cache: Any) -> float:
    """Bytes held by a KV cache's keys and values, in MiB."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total / 2**20


def run(args: argparse.Namespace) -> int:
    import math

    import torch
    from tqdm import tqdm

    import rope_ext
    from rope_ext._compat import cache_kwarg
    from rope_ext.eval.runner import set_threads
    from rope_ext.lengths import parse_length
    from rope_ext.patch import build_method

    new_tokens = parse_length(args.max_new_tokens, name="--max-new-tokens")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    params = parse_params(args.param)
    if args.sinks is not None or args.cache_window is not None:
        params.update(sinks=args.sinks, cache_window=args.cache_window)
    build_method(args.method, params)  # every parameter checked before the model is loaded
    set_threads(args.threads)
    logger.info("loading %s", args.model)
    model, tok = rope_ext.load(args.model)
    if args.method != "none" or params:
        logger.info("patched: %s", rope_ext.patch(model, args.method, **params).describe())
    ids = tok(args.prompt, return_tensors="pt").input_ids
    key = cache_kwarg(model)
    generator = torch.Generator().manual_seed(args.seed)
    cache, step_input, text = None, ids, []
    bar = tqdm(total=new_tokens, unit="tok", file=sys.stderr, disable=not logger.isEnabledFor(logging.INFO))
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(step_input, use_cache=True, **({key: cache} if cache is not None else {}))
            cache = getattr(out, key, None) or out.past_key_values
            logits = out.logits[0, -1].float()
            if args.temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits / args.temperature, -1), 1, generator=generator))
            text.append(token)
            step_input = torch.tensor([[token]])
            bar.update(1)
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.1f}", cache_mib=f"{cache_mib(cache):.1f}",
                            seen=cache.get_seq_length())
    bar.close()
    if not args.quiet_text:
        print(tok.decode(text))
    return 0
