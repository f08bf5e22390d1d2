"""Methods transformers also has natively give its logits; saved patched models reload."""
from __future__ import annotations

import pytest
import torch
from conftest import METHODS, main_spec, make_tiny, method_params

import rope_ext

NATIVE = [
    ("pi", {"factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ("dynamic_ntk", {"factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
    ("yarn", {"factor": 4.0}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("llama3", {"factor": 4.0}, {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 32,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name,params,native", NATIVE, ids=[n for n, _, _ in NATIVE])
def test_patched_equals_native_rope_parameters(family, name, params, native):
    ids = torch.randint(3, 97, (2, 100))
    model = make_tiny(family)
    rope_ext.patch(model, name, **params)
    ours = model(ids).logits
    reference = make_tiny(family, rope_parameters={"rope_theta": 10000.0, **native})
    assert torch.allclose(ours, reference(ids).logits, atol=1e-5)


def saves_natively(name: str) -> bool:
    """A static method whose formula is one of transformers' rope types: a plain load reproduces it."""
    cls = rope_ext.methods.get(name)
    model = make_tiny("llama")
    spec = main_spec(model)
    method = cls(**method_params(name, model, 90)).bind(spec)
    return cls.rotation == "static" and not method.needs_attention_hook and method.native_rope_parameters(spec) is not None


@pytest.mark.parametrize("name", [n for n in METHODS if saves_natively(n)])
def test_save_then_plain_from_pretrained_reproduces(tmp_path, name):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 97, (1, 90))
    model = make_tiny("llama")
    rope_ext.patch(model, name, **method_params(name, model, 90))
    expected = model(ids).logits
    rope_ext.save_pretrained(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert torch.allclose(plain(ids).logits, expected, atol=1e-5)
    again = rope_ext.from_pretrained(tmp_path)
    assert rope_ext.current(again).name == name
    assert torch.allclose(again(ids).logits, expected, atol=1e-5)


def test_non_native_method_reloads_with_rope_ext_and_warns_on_save(tmp_path):
    ids = torch.randint(3, 97, (1, 90))
    model = make_tiny("llama")
    rope_ext.patch(model, "leaky_rerope", window=8, k=4.0, logn=True)
    expected = model(ids).logits
    with pytest.warns(UserWarning, match="loads it UNPATCHED"):
        rope_ext.save_pretrained(model, tmp_path)
    assert model.config._attn_implementation == "rope_ext_sdpa"
    loaded = rope_ext.from_pretrained(tmp_path)
    handle = rope_ext.current(loaded)
    assert handle.name == "leaky_rerope" and handle.method.logn and handle.method.k == 4.0
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert any("rope_ext" in r.getMessage() for r in records), "a plain load must warn"
    plain = rope_ext.from_pretrained(tmp_path, apply_rope_ext=False)
    assert rope_ext.current(plain) is None and plain.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_smollm2_loads_and_patches():
    model, tok = rope_ext.load("smollm2")
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 8192
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model(ids).logits
        with rope_ext.patched(model, "yarn", factor=1.0):
            assert torch.equal(model(ids).logits, ref)
        with rope_ext.patched(model, "rerope", window=512):
            assert torch.equal(model(ids).logits, ref)
        with rope_ext.patched(model, "yarn", factor=4.0):
            assert not torch.equal(model(ids).logits, ref)
    assert torch.equal(model(ids).logits, ref)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: give a local checkpoint directory"):
        rope_ext.load(tmp_path / "nope")
