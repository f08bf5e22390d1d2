"""rope-ext: run RoPE language models past the context length they were trained on.

    model, tok = rope_ext.load("smollm2")
    rope_ext.patch(model, "yarn", factor=8)      # or: with rope_ext.patched(model, "rerope", window=512):
    rope_ext.unpatch(model)
"""
from ._compat import check_transformers

check_transformers()

from . import methods
from .models import from_pretrained, load, save_pretrained
from .patch import Patch, current, patch, patched, unpatch

__version__ = "0.1.0"
__all__ = ["Patch", "current", "from_pretrained", "load", "methods", "patch", "patched", "save_pretrained", "unpatch"]
