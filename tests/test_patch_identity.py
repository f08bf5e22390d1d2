"""Identity cases are bitwise, unpatch is bitwise, and every family accepts every method."""
from __future__ import annotations

import pytest
import torch
from conftest import ATTENTION_FAMILIES, FAMILIES, make_tiny

import rope_ext

IDENTITY = [
    ("none", {}), ("pi", {"factor": 1.0}), ("ntk", {"factor": 1.0}), ("ntk_by_parts", {"factor": 1.0}),
    ("yarn", {"factor": 1.0}), ("llama3", {"factor": 1.0}), ("dynamic_ntk", {}), ("dynamic_yarn", {}),
    ("rerope", {"window": 30}), ("leaky_rerope", {"window": 30, "k": 2.0}), ("self_extend", {"window": 30, "group_size": 4}),
]
EXTEND = [
    ("pi", {"factor": 4.0}), ("ntk", {"factor": 4.0}), ("yarn", {"factor": 4.0}), ("dynamic_ntk", {}),
    ("rerope", {"window": 8}), ("leaky_rerope", {"window": 8, "k": 4.0}), ("self_extend", {"window": 8, "group_size": 4}),
    ("alibi", {}), ("nope", {}), ("none", {"logn": True}), ("llama3", {"factor": 4.0}), ("ntk_by_parts", {"factor": 4.0}), ("dynamic_yarn", {}),
]


def snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return state, buffers, model.config.to_json_string(), model.config._attn_implementation


def assert_same(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a[2:] == b[2:]


def attn_for(family):
    return "eager" if family == "gemma2" else "sdpa"


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
@pytest.mark.parametrize("name,params", IDENTITY, ids=[n for n, _ in IDENTITY])
def test_identity_is_bitwise_and_unpatch_restores(family, name, params):
    model = make_tiny(family, attn=attn_for(family))
    ids = torch.randint(3, 97, (2, 20))
    ref = model(ids).logits
    before = snapshot(model)
    with rope_ext.patched(model, name, **params):
        assert torch.equal(model(ids).logits, ref), f"{name} identity is not bitwise on {family}"
    assert rope_ext.current(model) is None
    assert torch.equal(model(ids).logits, ref)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,params", EXTEND, ids=[n for n, _ in EXTEND])
def test_every_method_runs_past_trained_length_and_unpatches(family, name, params):
    model = make_tiny(family, attn=attn_for(family))
    ids = torch.randint(3, 97, (2, 80))
    ref = model(ids).logits
    before = snapshot(model)
    handle_kind = rope_ext.methods.get(name)
    if family == "falcon" and (handle_kind.rotation != "static" or params.get("logn")):
        with pytest.raises(ValueError, match="AttentionInterface"):
            rope_ext.patch(model, name, **params)
        assert_same(before, snapshot(model))
        return
    rope_ext.patch(model, name, **params)
    out = model(ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    rope_ext.unpatch(model)
    assert torch.equal(model(ids).logits, ref)
    assert_same(before, snapshot(model))


def test_two_models_carry_different_methods():
    a, b, plain = make_tiny("llama"), make_tiny("llama"), make_tiny("llama")
    ids = torch.randint(3, 97, (1, 70))
    ref = plain(ids).logits
    rope_ext.patch(a, "rerope", window=8)
    rope_ext.patch(b, "yarn", factor=4.0)
    ya = a(ids).logits
    yb = b(ids).logits
    assert not torch.allclose(ya, yb)
    assert torch.equal(plain(ids).logits, ref)
    assert rope_ext.current(a).name == "rerope" and rope_ext.current(b).name == "yarn"
    assert rope_ext.current(plain) is None


def test_replace_swaps_method_and_current_describes_it():
    model = make_tiny("qwen2")
    ids = torch.randint(3, 97, (1, 70))
    rope_ext.patch(model, "pi", factor=2.0)
    with pytest.raises(ValueError, match="already patched"):
        rope_ext.patch(model, "ntk", factor=2.0)
    rope_ext.patch(model, "rerope", window=8, replace=True)
    assert "rerope" in rope_ext.current(model).describe()
    with rope_ext.patched(make_tiny("qwen2"), "rerope", window=8) as h:
        other = h
    direct = model(ids).logits
    rope_ext.unpatch(model)
    fresh = make_tiny("qwen2")
    rope_ext.patch(fresh, "rerope", window=8)
    assert torch.equal(direct, fresh(ids).logits)
    assert other.name == "rerope"


def test_bfloat16_and_eager_sdpa_agree():
    ids = torch.randint(3, 97, (2, 70))
    outs = {}
    for attn in ("eager", "sdpa"):
        model = make_tiny("llama", attn=attn)
        with rope_ext.patched(model, "leaky_rerope", window=8, k=4.0):
            outs[attn] = model(ids).logits
    assert torch.allclose(outs["eager"], outs["sdpa"], atol=1e-4)
    model = make_tiny("llama", dtype=torch.bfloat16)
    with rope_ext.patched(model, "rerope", window=8):
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), outs["sdpa"], atol=0.15)
