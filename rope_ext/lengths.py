"""The one length syntax of rope-ext, shared by every command and API that takes a context length.

Accepted: a whole number of tokens (``32768``, ``32768.0``), a multiple of 1024 (``32k``, ``32K``,
``1.5k``), a multiple of 2^20 (``1M``, ``0.5m``), or a multiple of the model's trained length
(``4x``, ``1.5x``, rounded to the nearest token; needs that trained length). Whitespace around the
number and the suffix is ignored. Refused: bools, fractions of a token (``1.5``, ``0.1k``),
non-finite numbers, empty text, lengths below ``minimum`` (1 unless the caller needs more) and above
``MAX_LENGTH``; every error names the parameter and the value.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable

MAX_LENGTH = 1 << 24  # 16M tokens: above every published RoPE context (Llama 4 Scout: 10M); more is a typo
SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20}
SYNTAX = "tokens (32768), k = 1024 tokens (32k), M = 2^20 tokens (1M), or a multiple of the trained length (4x)"
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMxX]?)\s*")


def parse_length(text: str | int | float, trained_length: int | None = None, name: str = "length", *,
                 minimum: int = 1) -> int:
    """One context length in tokens from ``text`` (module docstring); ``"4x"`` needs ``trained_length``."""
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise ValueError(f"{name} must be {SYNTAX}; got {text!r}")
    if isinstance(text, numbers.Integral):
        tokens = int(text)
    elif isinstance(text, numbers.Real):
        if not math.isfinite(text) or not float(text).is_integer():
            raise ValueError(f"{name} must be a whole number of tokens, got {text!r}")
        tokens = int(text)
    else:
        tokens = _parse_text(text, trained_length, name)
    if tokens < minimum:
        raise ValueError(f"{name} must be at least {minimum} token{'s' if minimum > 1 else ''}, got {text!r} ({tokens} tokens)")
    if tokens > MAX_LENGTH:
        raise ValueError(f"{name} must be at most {MAX_LENGTH} tokens (16M, rope_ext.lengths.MAX_LENGTH), "
                         f"got {text!r} ({tokens} tokens)")
    return tokens


def _parse_text(text: str, trained_length: int | None, name: str) -> int:
    match = _PATTERN.fullmatch(text)
    if not match:
        raise ValueError(f"{name} must be {SYNTAX}; got {text!r}")
    number, suffix = match.group(1), match.group(2).lower()
    if suffix == "x":
        if trained_length is None:
            raise ValueError(f"{name} {text!r} is a multiple of a model's trained length, and a model's trained "
                             f"length is needed for it (none here); give tokens instead, e.g. 32768 or 32k")
        return round(float(number) * trained_length)
    if "." not in number:
        return int(number) * SUFFIXES[suffix]
    value = float(number) * SUFFIXES[suffix]
    if not value.is_integer():
        raise ValueError(f"{name} {text!r} is {value:g} tokens, not a whole number of tokens")
    return int(value)


def parse_lengths(text_or_list: str | Iterable[str | int | float], trained_length: int | None = None,
                  name: str = "--lengths", *, minimum: int = 1) -> list[int]:
    """Comma-separated lengths (or a list of them) in tokens, in the order given, duplicates dropped."""
    if isinstance(text_or_list, str):
        items: list = [item for item in text_or_list.split(",") if item.strip()]
    elif isinstance(text_or_list, Iterable):
        items = list(text_or_list)
    else:
        items = [text_or_list]
    if not items:
        raise ValueError(f"{name} must list at least one length ({SYNTAX}), got {text_or_list!r}")
    return list(dict.fromkeys(parse_length(item, trained_length, name, minimum=minimum) for item in items))
