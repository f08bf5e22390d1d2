"""Length-extrapolation methods: one registry, one small file per family of formulas."""
from . import alibi, frequency, rerope, self_extend  # noqa: F401  (registration)
from .base import Method, RopeSpec
from .registry import REGISTRY, get, names, register

__all__ = ["REGISTRY", "Method", "RopeSpec", "get", "names", "register"]
