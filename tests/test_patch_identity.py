"""Identity cases are bitwise, unpatch is bitwise, and every family accepts every method."""
from __future__ import annotations

import pytest
import torch
from conftest import ATTENTION_FAMILIES, FAMILIES, make_tiny
from registry_suite import case_id, check_identity_bitwise, check_patch_unpatch_bitwise, extend_cases, identity_method_names

import rope_ext


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
@pytest.mark.parametrize("name", identity_method_names())
def test_identity_is_bitwise_and_unpatch_restores(family, name):
    check_identity_bitwise(name, family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", extend_cases(), ids=case_id)
def test_every_method_runs_past_trained_length_and_unpatches(family, case):
    name, params = case
    check_patch_unpatch_bitwise(name, family, params)


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
    with pytest.raises(ValueError, match=r"model is already patched with pi\(.*\) on qwen2; call rope_ext.unpatch\(model\) first or pass replace=True"):
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
