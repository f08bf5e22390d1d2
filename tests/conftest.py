"""Shared fixtures: tiny randomly initialised models of every supported family, built offline."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("ROPE_EXT_TEST_THREADS", "2")))

TRAINED = 32

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXConfig", {"partial_rotary_factor": 0.5}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.5}),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2}),
}
FAMILIES = sorted(FAMILY_CONFIGS)
ATTENTION_FAMILIES = [f for f in FAMILIES if f != "falcon"]


def make_tiny(model_type: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A 2-layer random model of ``model_type`` trained-length 32, in eval mode."""
    import transformers

    cls_name, extra = FAMILY_CONFIGS[model_type]
    kwargs = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TRAINED, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


@pytest.fixture
def tiny():
    return make_tiny
