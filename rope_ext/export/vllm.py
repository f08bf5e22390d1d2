"""A rope_ext method as vLLM settings: ``hf_overrides`` (the model config's ``rope_parameters``, plus
``max_position_embeddings`` where vLLM needs it) and ``max_model_len``.

What vLLM reads (vllm-project/vllm, ``vllm/model_executor/layers/rotary_embedding/__init__.py``
``get_rope`` and ``vllm/transformers_utils/config.py`` ``patch_rope_parameters``, 2025-2026): the
config's ``rope_parameters`` (transformers 5's name; with transformers 4 vLLM copies a legacy
``rope_scaling`` into it), keyed by ``rope_type``:
  * ``default``: plain RoPE at ``rope_theta`` (rope_ext ``none``, and ``ntk`` as its new base);
  * ``linear``: theta_i / factor (``pi``); ``llama3``: the Llama 3.1 formula (``llama3``);
  * ``yarn``: YaRN with ``beta_fast``, ``beta_slow``, ``truncate`` and cos/sin times
    ``yarn_get_mscale(factor) * attn_factor`` -- vLLM's ``attn_factor`` MULTIPLIES the default
    0.1 ln(s) + 1, where transformers' ``attention_factor`` REPLACES it; both keys are written
    when rope_ext's ``attention_factor`` is given, so either reader gets the same magnitude;
  * ``dynamic``: one base computed for the longest length (``DynamicNTKScalingRotaryEmbedding``),
    not rope_ext's per-length base: ``dynamic_ntk`` is refused.
vLLM's derived maximum length is max_position_embeddings x factor for linear / dynamic and
original_max_position_embeddings x factor for yarn, but max_position_embeddings alone for default
and llama3: there the override raises max_position_embeddings to the context served.
"""
from __future__ import annotations

import json
import shlex
from typing import Any

from rope_ext.methods.base import Method
from rope_ext.methods.frequency import yarn_mscale

from .common import ModelFacts, check_exportable, check_method_name

EXPORTABLE = {"none": "default", "pi": "linear", "ntk": "default", "yarn": "yarn", "llama3": "llama3"}
UNSCALED_LENGTH_TYPES = ("default", "llama3")  # vLLM does not multiply max_position_embeddings for these
KEPT = ("partial_rotary_factor",)


def rope_parameters(method: Method, facts: ModelFacts) -> dict[str, Any]:
    """The ``rope_parameters`` under which vLLM (and transformers) compute ``method``'s frequencies."""
    check(method)
    params = method.native_rope_parameters(facts.spec) or {"rope_type": "default", "rope_theta": facts.spec.rope_theta}
    params = {**{k: facts.rope_parameters[k] for k in KEPT if k in facts.rope_parameters}, **params}
    if method.name == "yarn" and method.attention_factor is not None:
        params["attn_factor"] = method.attention_factor / yarn_mscale(method.s)
    return params


def check_name(name: str) -> None:
    """Refuse a method name vLLM has no setting for (before its parameters are read)."""
    check_method_name(name, "vLLM", EXPORTABLE)


def check(method: Method) -> None:
    """Refuse a method vLLM cannot run with the same formula (module docstring)."""
    check_exportable(method, "vLLM", EXPORTABLE)


def vllm_settings(method: Method, facts: ModelFacts, context: int) -> dict[str, Any]:
    """``{"hf_overrides", "max_model_len", "command", "python"}`` serving ``facts``' model with the
    bound ``method`` up to ``context`` tokens."""
    params = rope_parameters(method, facts)
    overrides: dict[str, Any] = {"rope_parameters": params}
    if params["rope_type"] in UNSCALED_LENGTH_TYPES and context > facts.max_position_embeddings:
        overrides["max_position_embeddings"] = context
    text = json.dumps(overrides, sort_keys=True)
    command = f"vllm serve {shlex.quote(facts.path)} --hf-overrides {shlex.quote(text)} --max-model-len {context}"
    python = (f"from vllm import LLM\n"
              f"llm = LLM(model={facts.path!r}, hf_overrides={overrides!r}, max_model_len={context})")
    return {"engine": "vllm", "method": method.name, "params": _jsonable(method.params()), "hf_overrides": overrides,
            "max_model_len": context, "command": command, "python": python}


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}
