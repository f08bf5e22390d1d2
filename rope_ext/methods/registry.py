"""The one registry of length-extrapolation methods: ``@register("name")`` on a Method dataclass."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .base import Method

REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type)


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``rope_ext.patch(model, name, ...)``."""

    def wrap(cls: M) -> M:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {REGISTRY[name].__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get(name: str) -> type[Method]:
    """The Method class registered as ``name``; a clear error lists what exists."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a str naming a registered method, got {type(name).__name__}: {name!r}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}") from None


def names() -> list[str]:
    return sorted(REGISTRY)
