"""The transformers versions rope-ext is tested with; outside them we fail early and clearly."""
from __future__ import annotations

import inspect
import warnings
from importlib.metadata import version

SUPPORTED = ((5, 15), (6, 0))  # [low, high): RoPE in config.rope_parameters, the attention seams we patch
TESTED = ((5, 15), (5, 25))  # the whole suite passed on both ends and on releases between them


def _parse(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_transformers(installed: str | None = None) -> None:
    """Fail below 5.15 or from 6.0 on (with the install command), warn past the newest tested 5.x."""
    installed = installed or version("transformers")
    low, high = SUPPORTED
    found = _parse(installed)
    if not low <= found < high:
        raise ImportError(
            f"rope-ext needs transformers >= {low[0]}.{low[1]} and < {high[0]}.{high[1]} (RoPE in "
            f"config.rope_parameters); found {installed}. Install with: pip install 'transformers>={low[0]}.{low[1]},<{high[0]}'"
        )
    if found > TESTED[1]:
        warnings.warn(
            f"rope-ext is tested with transformers {TESTED[0][0]}.{TESTED[0][1]} to {TESTED[1][0]}.{TESTED[1][1]}; found "
            f"{installed}, newer: it should work, and `bash scripts/test.sh` tells you whether it does", stacklevel=2,
        )


def cache_kwarg(model) -> str:
    """The keyword under which ``model.forward`` takes the KV cache: ``cache`` from transformers
    5.24, ``past_key_values`` before it (deprecated there, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
