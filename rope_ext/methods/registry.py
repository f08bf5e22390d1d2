"""The one registry of length-extrapolation methods: ``@register("name")`` on a Method dataclass
makes it ``rope_ext.patch(model, name, ...)``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..named_registry import NamedRegistry

if TYPE_CHECKING:
    from .base import Method

METHODS: NamedRegistry[Method] = NamedRegistry("method", "methods")
REGISTRY = METHODS.classes
register = METHODS.register
get = METHODS.get
names = METHODS.names
