"""Length-extrapolation methods: one registry, one small file per family of formulas."""
from . import alibi, block_memory, dca, dilated, frequency, rerope, self_extend  # noqa: F401  (registration)
from .base import Method
from .context import AttentionContext, CachePolicy, key_positions
from .registry import REGISTRY, get, names, register
from .spec import RopeSpec

__all__ = ["REGISTRY", "AttentionContext", "CachePolicy", "Method", "RopeSpec", "get", "key_positions", "names", "register"]
