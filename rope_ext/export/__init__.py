"""Take a rope_ext method to a serving engine: the settings under which llama.cpp or vLLM compute the
same frequencies and attention factor as ``rope_ext.patch`` would.

    facts = model_facts("smollm2")                      # config only, no weights
    method = bind("yarn", {"factor": 4}, facts)         # validated and completed as rope_ext.patch does
    vllm_settings(method, facts, context_length(method, None))      # hf_overrides, max_model_len, commands
    llama_cpp_settings(method, facts, 32768)            # flags, GGUF metadata, --override-kv
    write_gguf(facts.gguf, "out.gguf", llama_cpp_settings(...)["metadata"])

``settings(model, method, params, engine)`` does all of it in one call (what ``rope-ext export`` runs).
"""
from __future__ import annotations

import os
from typing import Any

from .common import ModelFacts, bind, context_length, model_facts
from . import llama_cpp, vllm
from .llama_cpp import gguf_metadata, llama_cpp_settings, write_gguf
from .vllm import vllm_settings

ENGINES = ("llama.cpp", "vllm")


def settings(model: str | os.PathLike, method: str, params: dict[str, Any], engine: str,
             context: int | None = None) -> dict[str, Any]:
    """The ``engine`` settings of ``method(**params)`` on ``model``, serving ``context`` tokens
    (default: what the method reaches)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    module = llama_cpp if engine == "llama.cpp" else vllm
    module.check_name(method)
    facts = model_facts(model)
    bound = bind(method, params, facts)
    module.check(bound)
    build = llama_cpp_settings if engine == "llama.cpp" else vllm_settings
    return build(bound, facts, context_length(bound, context))


__all__ = ["ENGINES", "ModelFacts", "bind", "context_length", "gguf_metadata", "llama_cpp_settings", "model_facts",
           "settings", "vllm_settings", "write_gguf"]
