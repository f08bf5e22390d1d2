"""KV-cache bytes and attention FLOPs: hand formulas, the cache transformers actually fills on tiny
models (GQA, sliding window, MLA), the Linear layers of the attention modules, and the causal mask."""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import make_tiny

from rope_ext import calc
from rope_ext.calc.budget import causal_pairs

TINY_DEEPSEEK = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=64,
)


def cache_bytes(model, length: int, batch: int = 2) -> int:
    ids = torch.randint(3, 97, (batch, length))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_gqa_kv_bytes_equal_hand_formula():
    config = transformers.LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    shape = calc.attention_shape(config)
    assert shape.kind == "GQA"
    for L, batch, dtype, size in ((4096, 1, "bfloat16", 2), (32768, 3, "float32", 4), (1000, 2, "fp8", 1)):
        assert calc.kv_cache_bytes(shape, L, batch, dtype) == 2 * 32 * 8 * 128 * L * size * batch


def test_mha_and_mqa_kinds():
    assert calc.attention_shape(transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=8, hidden_size=256)).kind == "MHA"
    mqa = calc.attention_shape(transformers.FalconConfig(hidden_size=256, num_attention_heads=8, multi_query=True))
    assert (mqa.kind, mqa.num_kv_heads) == ("MQA", 1)
    assert calc.kv_cache_bytes(mqa, 100, 1, 2) == 2 * mqa.num_layers * 1 * 32 * 100 * 2


def test_mla_kv_bytes_equal_latent_formula_deepseek_v3():
    config = transformers.DeepseekV3Config()
    shape = calc.attention_shape(config)
    assert shape.kind == "MLA"
    L = 131072
    assert calc.kv_cache_bytes(shape, L, 1, "bfloat16") == 61 * (512 + 64) * L * 2
    assert calc.kv_cache_bytes_decompressed(shape, L, 1, "bfloat16") == 61 * 128 * (192 + 128) * L * 2


@pytest.mark.parametrize("kind", ["llama", "mistral_sliding", "gemma2", "deepseek_v3"])
def test_kv_bytes_equal_the_cache_transformers_fills(kind):
    if kind == "deepseek_v3":
        config = transformers.DeepseekV3Config(**TINY_DEEPSEEK)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    elif kind == "mistral_sliding":
        model = make_tiny("mistral", attn="eager", sliding_window=16)
    else:
        model = make_tiny(kind, attn="eager")
    shape = calc.attention_shape(model.config)
    for L in (10, 40):
        assert calc.kv_cache_bytes(shape, L, 2, "float32") == cache_bytes(model, L)


@pytest.mark.parametrize("kind", ["llama", "deepseek_v3"])
def test_projection_flops_count_the_attention_linears(kind):
    if kind == "deepseek_v3":
        model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**TINY_DEEPSEEK))
    else:
        model = make_tiny("llama")
    macs = sum(m.in_features * m.out_features for layer in model.model.layers
               for m in layer.self_attn.modules() if isinstance(m, torch.nn.Linear))
    shape = calc.attention_shape(model.config)
    assert calc.projection_flops(shape, 100, 3) == 2 * 3 * 100 * macs


@pytest.mark.parametrize("L, W", [(1, None), (7, None), (50, 16), (16, 16), (10, 16)])
def test_causal_pairs_equal_the_mask(L, W):
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    mask = (j <= i) & ((i - j < W) if W else True)
    assert causal_pairs(L, W) == int(mask.sum())


def test_attention_flops_convention():
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
    shape = calc.attention_shape(config)
    L, d, H = 1000, 64, 4
    full = 2 * 2 * L * L * d * H * 2                     # 2 layers, QK^T and PV, full matrix
    assert calc.attention_flops(shape, L, causal=False) == full
    assert calc.attention_flops(shape, L) == pytest.approx(full / 2 * (L + 1) / L)
    assert calc.decode_attention_flops(shape, L) == 2 * H * 2 * d * (L + 1) * 2


@pytest.mark.parametrize("call, text", [
    (lambda s: calc.kv_cache_bytes(s, 0), "^length must be at least 1 token, got 0"),
    (lambda s: calc.kv_cache_bytes(s, 10, 0), r"batch_size must be an integer >= 1, got 0"),
    (lambda s: calc.kv_cache_bytes(s, 10, 1, "float13"), "unknown dtype 'float13'; known: float32"),
    (lambda s: calc.attention_flops(s, -5), "^length must be at least 1 token, got -5"),
])
def test_bad_input_names_the_value(call, text):
    shape = calc.attention_shape(transformers.LlamaConfig(num_hidden_layers=2))
    with pytest.raises(ValueError, match=text):
        call(shape)
