"""Train-time position encodings of the lab, by name: ``@register("name")`` on an ``Encoding``
dataclass (``base.py``); ``build(name, params)`` validates and returns one, which ``install``s itself
on a fresh lab model (``rope_ext.eval.lab.build_model``). Importing this package imports every
module in it, so a new encoding is one file with one ``@register``.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from .base import Encoding

REGISTRY: dict[str, type[Encoding]] = {}
E = TypeVar("E", bound=type)


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make ``cls`` the lab encoding ``name`` (``rope-ext pretrain --pe name``)."""

    def wrap(cls: E) -> E:
        if name in REGISTRY:
            raise ValueError(f"encoding {name!r} is already registered by {REGISTRY[name].__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get(name: str) -> type[Encoding]:
    """The Encoding class registered as ``name``; an unknown name lists the registered ones."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown position encoding {name!r}; registered encodings: {', '.join(names())}")
    return REGISTRY[name]


def names() -> list[str]:
    return sorted(REGISTRY)


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
