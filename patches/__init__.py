"""Model families: where RoPE and attention live in each transformers architecture, and only what
differs. A family that differs in nothing is one line in ``FAMILIES``; one that differs has a small
module here (see ``gemma3.py``, ``falcon.py``). Nothing here knows any formula.
"""
from __future__ import annotations

from . import falcon, gemma3
from .family import Family, family_for, supported_model_types

FAMILIES: dict[str, Family] = {}


def add(family: Family) -> Family:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


add(Family("llama", ("llama",)))
add(Family("mistral", ("mistral",)))
add(Family("qwen2", ("qwen2",)))
add(Family("qwen3", ("qwen3",)))
add(Family("gemma", ("gemma",)))
add(Family("gemma2", ("gemma2",), notes="attention logit softcap is passed through to every method"))
add(gemma3.FAMILY)
add(Family("phi3", ("phi3",), notes="partial rotary factor"))
add(Family("gpt_neox", ("gpt_neox",), notes="partial rotary (rotary_pct)"))
add(Family("olmo2", ("olmo2",)))
add(Family("granite", ("granite",)))
add(Family("stablelm", ("stablelm",), notes="partial rotary"))
add(Family("phi", ("phi",), notes="partial rotary"))
add(falcon.FAMILY)

__all__ = ["FAMILIES", "Family", "family_for", "supported_model_types"]
