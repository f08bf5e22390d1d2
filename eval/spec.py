"""What a run evaluates: lengths, methods and their parameters, with every default made explicit.

The harness knows methods only by name + parameter dict; ``rope_ext.patch`` does the rest. Defaults
filled in per (method, length) -- recorded in every result:
  * scaled frequency methods (pi, ntk, ntk_by_parts, yarn, llama3): ``target_length = max(length,
    trained length)`` (factor = length / trained length) unless factor / target_length / base is given;
  * dynamic_ntk, dynamic_yarn: no factor (they scale from the current length);
  * rerope, leaky_rerope, self_extend: ``window = trained_length // 2``;
  * leaky_rerope: ``k = max(2, (length - window) / (trained_length - window))``, the slope at which
    the largest remapped distance stays inside the trained length;
  * self_extend: ``group_size = max(2, ceil(length / trained_length))``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from rope_ext.methods import registry

SCALED = ("pi", "ntk", "ntk_by_parts", "yarn", "llama3")
SCALE_KEYS = ("factor", "target_length", "base")
WINDOWED = ("rerope", "leaky_rerope", "self_extend")
SLIDING = "sliding_window"
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*$|^\s*(\d+)\s*$")


def trained_length(config: Any) -> int:
    """A model's trained length: rope_parameters["original_max_position_embeddings"] when present,
    else config.max_position_embeddings."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" not in params and params:
        params = next(iter(params.values()))
    value = params.get("original_max_position_embeddings") if isinstance(params, dict) else None
    value = value or getattr(config, "max_position_embeddings", None)
    if not value:
        raise ValueError("the model's trained length is unknown (no max_position_embeddings in its config)")
    return int(value)


def parse_length(text: str | int, trained: int) -> int:
    """"4x" -> 4 * trained; "3000" or 3000 -> 3000 tokens. Lengths must be >= 2 tokens."""
    if isinstance(text, bool):
        raise ValueError(f"length must be tokens (e.g. 2048) or a multiple of the trained length (e.g. 4x), got {text!r}")
    if isinstance(text, int):
        tokens = text
    else:
        match = _LENGTH.match(str(text))
        if not match:
            raise ValueError(f"length {text!r} is neither tokens (e.g. 2048) nor a multiple of the trained length (e.g. 4x)")
        tokens = round(float(match.group(1)) * trained) if match.group(1) else int(match.group(2))
    if tokens < 2:
        raise ValueError(f"length {text!r} gives {tokens} tokens; a length must be at least 2 tokens (one prediction)")
    return tokens


def parse_lengths(spec: str | Iterable[str | int], trained: int) -> list[int]:
    """Comma-separated (or a list of) lengths, in the order given, duplicates dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or all(isinstance(i, str) and not i.strip() for i in items):
        raise ValueError("no lengths given; e.g. --lengths 1x,2x,4x or 512,1024")
    out: list[int] = []
    for item in items:
        tokens = parse_length(item, trained)
        if tokens not in out:
            out.append(tokens)
    return out


def parse_value(text: str) -> Any:
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


def resolve(method: str, given: dict[str, Any], length: int, trained: int, sliding_stride: int | None = None) -> dict[str, Any]:
    """The parameters ``method`` runs with at ``length`` (given ones win; defaults per module docstring)."""
    params = dict(given)
    if method == SLIDING:
        window = params.setdefault("window", trained)
        params.setdefault("stride", sliding_stride or max(1, window // 2))
        return params
    if method in SCALED and not any(k in params for k in SCALE_KEYS):
        params["target_length"] = max(length, trained)
    if method in WINDOWED:
        params.setdefault("window", trained // 2)
    if method == "leaky_rerope" and "k" not in params:
        w = params["window"]
        params["k"] = float(max(2.0, (length - w) / max(1, trained - w)))
    if method == "self_extend" and "group_size" not in params:
        params["group_size"] = max(2, math.ceil(length / trained))
    return params

