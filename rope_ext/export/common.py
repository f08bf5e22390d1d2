"""What every export needs: the model's RoPE facts (read from its config only), the method bound to
them exactly as ``rope_ext.patch`` binds it, the context length the engine serves, and the refusal
of a method an engine cannot run with the same formula."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rope_ext.methods.base import Method
from rope_ext.methods.spec import RopeSpec


@dataclass(frozen=True)
class ModelFacts:
    """A model's RoPE facts as an engine needs them: ``spec`` (base, rotary dim, trained length),
    the config's own ``rope_parameters``, ``max_position_embeddings``, ``model_type``, the path an
    engine loads (``path``) and, for a GGUF source, that file (``gguf``) and its architecture."""

    path: str
    model_type: str
    spec: RopeSpec
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    gguf: Path | None = None
    gguf_arch: str | None = None


def model_facts(model: str | os.PathLike) -> ModelFacts:
    """The facts of a checkpoint directory, a ``.gguf`` or an alias (``smollm2``); no weights are loaded."""
    from rope_ext.facts import config_facts
    from rope_ext.models import ALIASES, load_config, shipped_gguf

    config = load_config(model)
    specs = config_facts(config)["specs"]
    if len(specs) != 1:
        raise ValueError(f"{model}: its layers use {len(specs)} RoPE tables ({', '.join(map(str, specs))}); export "
                         "handles models with one RoPE table only")
    name = os.fspath(model)
    path = shipped_gguf(name) if name in ALIASES else Path(name).resolve()
    gguf = path if path.suffix.lower() == ".gguf" else None
    return ModelFacts(path=str(path), model_type=config.model_type, spec=next(iter(specs.values())),
                      rope_parameters=dict(config.rope_parameters or {}),
                      max_position_embeddings=int(config.max_position_embeddings), gguf=gguf,
                      gguf_arch=_gguf_arch(gguf) if gguf is not None else None)


def _gguf_arch(path: Path) -> str:
    from gguf import GGUFReader, Keys

    field = GGUFReader(path).get_field(Keys.General.ARCHITECTURE)
    if field is None:
        raise ValueError(f"{path} has no {Keys.General.ARCHITECTURE} entry: not a model GGUF")
    return str(field.contents())


def bind(method: str, params: dict[str, Any], facts: ModelFacts) -> Method:
    """``method`` built from ``params`` and bound to the model: the same validation, defaults and
    derived values (factor from target_length, trained length) as ``rope_ext.patch``."""
    from rope_ext.patch import build_method

    built = build_method(method, params)
    spec = facts.spec
    if built.original_max_position_embeddings is not None:
        spec = dataclasses.replace(spec, trained_length=built.original_max_position_embeddings)
    bound = built.bind(spec)
    bound.check_reach()
    return bound


def check_method_name(name: str, engine: str, exportable: dict[str, str]) -> None:
    """Refuse a method ``engine`` has no setting for, before its parameters are even read."""
    if name not in exportable:
        raise ValueError(f"{name} cannot be exported to {engine}: it has no {engine} setting with the same "
                         f"formula; exportable methods: {', '.join(sorted(exportable))}")


def check_exportable(method: Method, engine: str, exportable: dict[str, str], reason: str | None = None) -> None:
    """Refuse a method (or a setting of it) that ``engine`` cannot run with rope_ext's formula."""
    names = ", ".join(sorted(exportable))
    check_method_name(method.name, engine, exportable)
    if method.logn or method.cache_policy() is not None:
        what = "logn=True (log-n query scaling)" if method.logn else "sinks / cache_window (a rolling KV cache)"
        raise ValueError(f"{method.name} with {what} cannot be exported to {engine}: the engine has no such setting; "
                         f"exportable: {names} without logn, sinks or cache_window")
    if reason is not None:
        raise ValueError(f"{method.name} cannot be exported to {engine}: {reason}")


def context_length(method: Method, given: int | None) -> int:
    """The context the engine serves: ``given``, else what the method reaches (trained length x
    factor). More than the method reaches is refused; a method without a fixed reach needs it given."""
    reach = method.reach
    if given is None:
        if reach is None:
            raise ValueError(f"{method.name} with these parameters reaches no fixed length (an explicit base): give "
                             "the context length the engine should serve (--context-length, e.g. 32k)")
        return reach
    if reach is not None and given > reach:
        raise ValueError(f"context length {given} exceeds the {reach} tokens {method.name} reaches (trained length "
                         f"{method.trained_length}); give at most {reach}, or a larger factor")
    return given
