"""Train-time position encodings of the lab, by name: ``@register("name")`` on an ``Encoding``
dataclass (``base.py``); ``build(name, params)`` validates and returns one, which ``install``s itself
on a fresh lab model (``rope_ext.eval.lab.build_model``). Importing this package imports every
module in it, so a new encoding is one file with one ``@register``.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from rope_ext.named_registry import NamedRegistry

from .base import Encoding

ENCODINGS: NamedRegistry[Encoding] = NamedRegistry("position encoding", "encodings")
REGISTRY = ENCODINGS.classes
register = ENCODINGS.register
get = ENCODINGS.get
names = ENCODINGS.names


def build(name: str, params: dict[str, Any]) -> Encoding:
    """The encoding ``name`` with ``params`` (validated); an unknown parameter lists the allowed."""
    cls = get(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for encoding "
                         f"{name!r}; allowed: {', '.join(allowed) or 'none'}")
    return cls(**params)


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Encoding", "REGISTRY", "build", "get", "names", "register"]
