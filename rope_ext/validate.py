"""The one validation layer for the values a user gives: the Python API (method parameters, loaders,
the calculator), the CLI's flags and the recipes all check through these functions, so a value is
refused the same way, with the same message, wherever it enters.

Each check returns the value (as the type asked for) or raises -- TypeError for a wrong type,
ValueError for a value out of range -- with a message naming the parameter, the value given and what
is allowed. Numbers are always finite (NaN and infinities are refused everywhere). ``flag(check,
...)`` turns a check into an argparse ``type=``: a bad flag value is then argparse's one-line error
and exit status 2. A leaf module: it imports nothing of rope_ext.
"""
from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Collection
from typing import Any

MAX_COUNT = 1 << 24  # the largest count of anything (steps, documents, trials, tokens): the length limit
MAX_BASE = 1e12  # the largest RoPE base (bases in use reach ~1e9)
MAX_SEED = 2**32 - 1  # numpy's and torch's common seed range
MAX_WORKERS = 1024  # threads or processes
MAX_ALIBI_BIAS = 64.0  # ALiBi's largest max_bias (the paper uses 8; slopes 2^-64 are already zero in fp16)


def integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be int, got {type(value).__name__}: {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value}")
    return value


def number(value: Any, name: str, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None, at_most: float | None = None, bound_name: str | None = None) -> float:
    """A finite real number (int or float, not a bool) inside the bounds given; ``bound_name``: the
    parameter a bound comes from (``beta_fast`` > ``beta_slow``), named in the message too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be int or float, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    for bound, word, holds in ((above, ">", float.__gt__), (at_least, ">=", float.__ge__),
                               (below, "<", float.__lt__), (at_most, "<=", float.__le__)):
        if bound is not None and not holds(value, float(bound)):
            shown = f"{bound_name} ({bound:g})" if bound_name else f"{bound:g}"
            raise ValueError(f"{name} must be {word} {shown}, got {value:g}")
    return value


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be bool (True or False), got {type(value).__name__}: {value!r}")
    return value


def text(value: Any, name: str, *, choices: Collection[str] | None = None) -> str:
    """A non-empty string, one of ``choices`` when given."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}: {value!r}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def flag(check: Callable[..., Any], **bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses the flag's text as ``check``'s type and applies ``check``."""
    parse = {integer: int, number: float}.get(check, str)

    def convert(raw: str) -> Any:
        try:
            value = parse(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if parse is int else 'a number'}, got {raw!r}") from None
        try:
            return check(value, "the value", **bounds)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err).replace("the value ", "", 1)) from None

    convert.__name__ = {int: "integer", float: "number"}.get(parse, "text")
    return convert


COUNT = flag(integer, minimum=1, maximum=MAX_COUNT)  # documents, trials, steps, sizes: 1 .. 2^24
NON_NEGATIVE = flag(integer, minimum=0, maximum=MAX_COUNT)
SEED = flag(integer, minimum=0, maximum=MAX_SEED)
WORKERS = flag(integer, minimum=1, maximum=MAX_WORKERS)  # --threads, --num-processes
