"""What a run evaluates: lengths, methods and their parameters, with every default made explicit.

The harness knows methods only by name + parameter dict; ``rope_ext.patch`` does the rest. The
parameters of each (method, length) are the method's own defaults for that length
(``Method.defaults_for``, the one source that ``rope-ext calc`` and LongLoRA use too) under the ones
given, and are recorded in every result.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from rope_ext.facts import trained_length  # noqa: F401  (the harness's one import of it)
from rope_ext.methods import RopeSpec, registry
from rope_ext.validate import MAX_COUNT, integer

SLIDING = "sliding_window"


def parse_value(text: str) -> Any:
    """A parameter value from the command line: true / false, an int, a float, a comma-separated
    tuple of those (``segments=2048,4096``), else the text."""
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated method names, each checked against the registry (plus "sliding_window")."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"no methods given; choose from: {', '.join(registry.names())}, {SLIDING}")
    for name in names:
        if name != SLIDING:
            registry.get(name)
    return list(dict.fromkeys(names))


def parse_method_params(items: Iterable[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """["rerope.window=32", "yarn.beta_fast=16"] -> {"rerope": {"window": 32}, "yarn": {...}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        match = re.match(r"^\s*([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\s*=\s*(.+?)\s*$", item)
        if not match:
            raise ValueError(f"method parameter {item!r} must look like METHOD.NAME=VALUE, e.g. rerope.window=32")
        method, name, value = match.groups()
        if method not in methods:
            raise ValueError(f"method parameter {item!r} names {method!r}, which is not among the methods run: {', '.join(methods)}")
        out.setdefault(method, {})[name] = parse_value(value)
    return out


def resolve(method: str, given: dict[str, Any], length: int, spec: RopeSpec, sliding_stride: int | None = None) -> dict[str, Any]:
    """The parameters ``method`` runs with at ``length`` on a model with ``spec``: the given ones,
    then the method's ``defaults_for``. The sliding-window baseline: window = trained length,
    stride = window / 2 unless given."""
    params = dict(given)
    if method == SLIDING:
        window = integer(params.setdefault("window", spec.trained_length), f"{SLIDING}.window", minimum=1, maximum=MAX_COUNT)
        stride = params.setdefault("stride", max(1, window // 2) if sliding_stride is None else sliding_stride)
        integer(stride, f"{SLIDING}.stride (--sliding-stride)", minimum=1, maximum=window)
        return params
    return registry.get(method).defaults_for(spec, length, **params)
