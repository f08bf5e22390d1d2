"""Shared fixtures: tiny randomly initialised models of every registered family, built offline.

The lists the shared suites run over come from the registries, so a newly registered family or
method is tested without editing a list here: FAMILIES from ``rope_ext.patches.FAMILIES``, METHODS
from ``rope_ext.methods.names()``, and each method's example parameters from its ``defaults_for``.
"""
from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch

import rope_ext
from rope_ext import facts
from rope_ext.patches import FAMILIES as FAMILY_REGISTRY

torch.set_num_threads(int(os.environ.get("ROPE_EXT_TEST_THREADS", "2")))

TRAINED = 32

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=TRAINED, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)
OVERRIDES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": None},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 16, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0,
               "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"partial_rotary_factor": 0.5},
    "gpt_neox": {"partial_rotary_factor": 0.5},
    "stablelm": {"partial_rotary_factor": 0.5},
    "phi": {"partial_rotary_factor": 0.5},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
}
FAMILIES = sorted(FAMILY_REGISTRY)
ATTENTION_FAMILIES = [f for f in FAMILIES if FAMILY_REGISTRY[f].attention_interface]
METHODS = rope_ext.methods.names()


def make_tiny(model_type: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A 2-layer random model of ``model_type`` trained-length 32, in eval mode."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **OVERRIDES.get(model_type, {}), **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def attn_for(model_type: str) -> str:
    """"sdpa" where the family's transformers model supports it, else "eager" (Gemma 2's softcap)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config_class = type(transformers.AutoConfig.for_model(model_type))
    return "sdpa" if MODEL_FOR_CAUSAL_LM_MAPPING[config_class]._supports_sdpa else "eager"


def main_spec(model) -> rope_ext.methods.RopeSpec:
    """The RopeSpec a method binds to on ``model``."""
    return facts.main_spec(facts.model_specs(model))


def method_params(name: str, model, length: int, **given: Any) -> dict[str, Any]:
    """The registered method's own example parameters (``defaults_for``) to reach ``length`` on ``model``."""
    return rope_ext.methods.get(name).defaults_for(main_spec(model), length, **given)


@pytest.fixture
def tiny():
    return make_tiny


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same state of torch's generators (CPU and CUDA) and python's
    ``random``, so what it draws does not depend on which tests ran before it. (numpy's global
    generator is not drawn from by the tests or rope_ext.)"""
    random.seed(0)
    torch.manual_seed(0)


TINY_LAB = dict(context=16, layers=1, hidden=32, heads=2, intermediate=32, steps=3, batch=2, warmup=1)  # a lab model in a second


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> str:
    """A one-file text corpus (a small Python function, repeated) for lab models in tests."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return str(path)


@pytest.fixture(scope="session")
def lab_lm(tmp_path_factory, text_corpus):
    """A tiny lab model (``TINY_LAB``) trained on ``text_corpus``: its directory."""
    from rope_ext.eval.lab import LabConfig, pretrain

    return pretrain(LabConfig(**TINY_LAB, corpus=text_corpus), tmp_path_factory.mktemp("lab") / "lm")
