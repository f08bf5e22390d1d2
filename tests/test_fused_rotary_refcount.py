"""The module-level ``apply_rotary_pos_emb`` swap is counted per modeling module: it is installed for
the first patched model of a family and the original comes back only when the last one is unpatched
(in either order, and after a patch that failed midway), while an unpatched model never changes."""
from __future__ import annotations

import sys

import pytest
import torch

import rope_ext
from rope_ext import fused_rotary
from tests.conftest import make_tiny

METHODS = [("rerope", {"window": 8}), ("dynamic_ntk", {"factor": 2.0})]
IDS = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def counted(monkeypatch):
    """Three tiny llamas, their modeling module, and a call-counting stand-in for its original
    ``apply_rotary_pos_emb`` (the object the swap must give back)."""
    models = make_tiny("llama"), make_tiny("llama", seed=1), make_tiny("llama", seed=2)
    modeling = sys.modules[type(models[0]).__module__]
    monkeypatch.setattr(fused_rotary, "_USERS", {})  # models other tests left patched are not counted here
    if fused_rotary.is_dispatching(modeling.apply_rotary_pos_emb):
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", getattr(modeling.apply_rotary_pos_emb, fused_rotary.MARK))
    assert fused_rotary.users(modeling) == 0 and not fused_rotary.is_dispatching(modeling.apply_rotary_pos_emb)
    calls = []
    real = modeling.apply_rotary_pos_emb

    def original(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", original)
    return models, modeling, original, calls


@pytest.mark.parametrize("first", [0, 1], ids=["first-patched-unpatched-first", "second-patched-unpatched-first"])
@pytest.mark.parametrize("method,params", METHODS)
def test_unpatching_one_model_keeps_the_others_swap(counted, first, method, params):
    (a, b, bystander), modeling, original, calls = counted
    layers = a.config.num_hidden_layers
    bystander_before = logits(bystander)
    rope_ext.patch(a, method, **params)
    rope_ext.patch(b, method, **params)
    assert fused_rotary.is_dispatching(modeling.apply_rotary_pos_emb) and fused_rotary.users(modeling) == 2
    patched_before = [logits(a), logits(b)]
    assert torch.equal(logits(bystander), bystander_before)
    remaining = 1 - first

    rope_ext.unpatch((a, b)[first])
    assert fused_rotary.is_dispatching(modeling.apply_rotary_pos_emb) and fused_rotary.users(modeling) == 1
    calls.clear()
    assert torch.equal(logits((a, b)[remaining]), patched_before[remaining])
    assert calls == [], "the remaining patched model lost its fast path"
    assert torch.equal(logits(bystander), bystander_before)
    assert len(calls) == layers, "an unpatched model must take the original function"

    rope_ext.unpatch((a, b)[remaining])
    assert modeling.apply_rotary_pos_emb is original and fused_rotary.users(modeling) == 0
    assert torch.equal(logits(bystander), bystander_before)


@pytest.mark.parametrize("others", [0, 1])
def test_a_patch_failing_after_install_gives_its_count_back(counted, monkeypatch, others):
    (a, b, bystander), modeling, original, calls = counted
    bystander_before, a_before = logits(bystander), logits(a)
    if others:
        rope_ext.patch(b, "rerope", window=8)
    install = fused_rotary.install

    def install_then_fail(*args, **kwargs):
        install(*args, **kwargs)
        assert fused_rotary.users(modeling) == others + 1
        raise RuntimeError("failure after install")

    monkeypatch.setattr(fused_rotary, "install", install_then_fail)
    with pytest.raises(RuntimeError, match="failure after install"):
        rope_ext.patch(a, "rerope", window=8)
    assert rope_ext.current(a) is None and fused_rotary.users(modeling) == others
    assert torch.equal(logits(a), a_before) and torch.equal(logits(bystander), bystander_before)
    if others:
        assert fused_rotary.is_dispatching(modeling.apply_rotary_pos_emb)
        rope_ext.unpatch(b)
    assert modeling.apply_rotary_pos_emb is original and fused_rotary.users(modeling) == 0
