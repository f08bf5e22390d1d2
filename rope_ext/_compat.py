"""The transformers versions rope-ext is tested with; outside them we fail early and clearly."""
from __future__ import annotations

import inspect
from importlib.metadata import version

SUPPORTED = ((5, 0), (6, 0))


def _parse(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_transformers() -> None:
    installed = version("transformers")
    low, high = SUPPORTED
    if not low <= _parse(installed) < high:
        raise ImportError(
            f"rope-ext needs transformers >= {low[0]}.{low[1]} and < {high[0]}.{high[1]} (RoPE in "
            f"config.rope_parameters); found {installed}. Install with: pip install 'transformers>=5,<6'"
        )


def cache_kwarg(model) -> str:
    """The keyword under which ``model.forward`` takes the KV cache: ``cache`` from transformers
    5.24, ``past_key_values`` before it (deprecated there, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
