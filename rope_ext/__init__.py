"""rope-ext: run RoPE language models past the context length they were trained on.

    model, tok = rope_ext.load("smollm2")
    rope_ext.patch(model, "yarn", factor=8)      # or: with rope_ext.patched(model, "rerope", window=512):
    rope_ext.unpatch(model)

The public names are imported on first use (PEP 562), so ``import rope_ext`` (and ``rope-ext --help``)
loads neither torch nor transformers; ``from rope_ext import patch`` and ``rope_ext.patch`` work as
usual, and so does any submodule as an attribute (``rope_ext.eval.perplexity``). The installed
transformers version is checked here, at import, from its package metadata (nothing is imported).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ._compat import check_transformers

check_transformers()

try:
    __version__ = version("rope-ext")
except PackageNotFoundError:  # a source tree that was never installed: no distribution to ask
    __version__ = "0+unknown"

_SOURCES = {  # public name -> the submodule that defines it
    "Patch": "patch", "current": "patch", "patch": "patch", "patched": "patch", "unpatch": "patch",
    "from_pretrained": "models", "load": "models", "save_pretrained": "models",
}
__all__ = ["Patch", "current", "from_pretrained", "load", "methods", "patch", "patched", "save_pretrained", "unpatch"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule on first access; else a submodule of that name."""
    if name in _SOURCES:
        value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``rope_ext.patch`` would set the attribute ``rope_ext.patch`` to that
    module (the import system does so on a submodule's first import); the function keeps the name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "patch" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
