"""Bad input: a clear error naming the bad value and what is allowed; the model left untouched."""
from __future__ import annotations

import pytest
import torch
from conftest import METHODS, make_tiny, method_params
from registry_suite import assert_same, snapshot

import rope_ext

BAD = [
    (("bogus",), {}, ValueError, "unknown method .bogus.; registered methods: .*yarn"),
    (("pi",), {"factor": 0.0}, ValueError, "factor must be > 0"),
    (("pi",), {"factor": -2.0}, ValueError, "factor must be > 0"),
    (("pi",), {"factor": 0.5}, ValueError, "pi: factor must be >= 1"),
    (("yarn",), {"factor": "8"}, TypeError, "factor must be int or float, got str"),
    (("ntk",), {"factor": 2.0, "base": 1e5}, ValueError, "either base or factor"),
    (("rerope",), {"window": 0}, ValueError, "window must be an integer >= 1, got 0"),
    (("rerope",), {"window": 32}, ValueError, "window=32 must be < the trained length 32"),
    (("rerope",), {"window": 8.5}, TypeError, "window must be int"),
    (("rerope",), {}, TypeError, "missing required parameter.*window"),
    (("leaky_rerope",), {"window": 8, "k": 1.0}, ValueError, "k must be > 1"),
    (("self_extend",), {"window": 8, "group_size": 0}, ValueError, "group_size must be an integer >= 1"),
    (("alibi",), {"max_bias": -1.0}, ValueError, "max_bias must be > 0"),
    (("yarn",), {"factor": 2.0, "beta_fast": 0.5}, ValueError, r"beta_fast must be > beta_slow \(1\), got 0.5"),
    (("pi",), {"factor": 2.0, "window": 3}, TypeError, "unknown parameter.*window; allowed: .*factor"),
    (("pi",), {"factor": 2.0, "logn": "yes"}, TypeError, "logn must be bool"),
    (("pi",), {"factor": 2.0, "kernel": "cuda"}, ValueError, "kernel must be one of auto, triton, torch"),
    (("pi",), {"factor": 2.0, "kernel": "compiled"}, ValueError, "kernel must be one of auto, triton, torch for rope_ext.patch"),
    ((123,), {}, TypeError, "method must be a str"),
]


@pytest.mark.parametrize("args,params,exc,match", BAD, ids=[f"{a[0]}-{p}" for a, p, _, _ in BAD])
def test_bad_parameters_leave_model_untouched(args, params, exc, match):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        rope_ext.patch(model, *args, **params)
    assert rope_ext.current(model) is None
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_rejects_an_unknown_parameter_untouched(name):
    model = make_tiny("llama")
    params = method_params(name, model, 80)
    before = snapshot(model)
    with pytest.raises(TypeError, match=f"{name}: unknown parameter.*no_such_parameter; allowed: .*logn"):
        rope_ext.patch(model, name, **params, no_such_parameter=1)
    assert rope_ext.current(model) is None
    assert_same(before, snapshot(model))


def test_non_rope_model_and_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="'gpt2'.*has no RoPE.*supported model types: .*llama"):
        rope_ext.patch(gpt2, "pi", factor=2.0)
    from transformers import MixtralConfig, MixtralForCausalLM

    mixtral = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, num_local_experts=2, vocab_size=50))
    with pytest.raises(ValueError, match="'mixtral'.*not a supported family"):
        rope_ext.patch(mixtral, "pi", factor=2.0)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel.*, got Linear"):
        rope_ext.patch(torch.nn.Linear(2, 2), "pi", factor=2.0)


def test_double_patch_and_unpatch_of_unpatched():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM is not patched by rope_ext"):
        rope_ext.unpatch(model)
    rope_ext.patch(model, "yarn", factor=2.0)
    after_first = snapshot(model)
    with pytest.raises(ValueError, match="already patched with yarn"):
        rope_ext.patch(model, "pi", factor=2.0)
    with pytest.raises(ValueError, match="window=40 must be <"):
        rope_ext.patch(model, "rerope", window=40, replace=True)
    assert rope_ext.current(model).name == "yarn"
    assert_same(after_first, snapshot(model))


def test_missing_trained_length():
    model = make_tiny("llama")
    object.__setattr__(model.config, "max_position_embeddings", None)  # a config that lost it (strict configs refuse None)
    before = snapshot(model)
    with pytest.raises(ValueError, match="trained length is unknown"):
        rope_ext.patch(model, "pi", factor=2.0)
    assert_same(before, snapshot(model))
    rope_ext.patch(model, "pi", factor=2.0, original_max_position_embeddings=32)
    assert rope_ext.current(model).method.trained_length == 32


def test_failure_midway_rolls_back(monkeypatch):
    import sys

    patch_module = sys.modules["rope_ext.patch"]

    model = make_tiny("llama")
    before = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure after frequencies were written")

    monkeypatch.setattr(patch_module, "_write_config", boom)
    with pytest.raises(RuntimeError, match="injected"):
        rope_ext.patch(model, "yarn", factor=4.0)
    assert rope_ext.current(model) is None
    assert_same(before, snapshot(model))
