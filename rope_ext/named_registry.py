"""A registry of classes by name, filled by a class decorator: the shape shared by rope_ext's methods
and the lab's position encodings."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=type)


class NamedRegistry(Generic[T]):
    """Classes registered under unique names; ``kind`` ("method", "position encoding") names them in errors."""

    def __init__(self, kind: str, plural: str) -> None:
        self.kind, self.plural = kind, plural
        self.classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: register ``cls`` as ``name`` and set ``cls.name``; a name is taken once."""

        def wrap(cls: C) -> C:
            if name in self.classes:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self.classes[name].__qualname__}")
            cls.name = name
            self.classes[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a clear error lists what exists."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be a str naming a registered {self.kind}, got {type(name).__name__}: {name!r}")
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.plural}: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self.classes)
