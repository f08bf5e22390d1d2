"""The training-only attention seam (LongLoRA's S2-Attn plugs in here)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import rope_ext


class FullCausal:
    """A pattern that is plain causal attention: the model must behave as without it."""

    calls = 0

    def attend(self, query, key, value, causal):
        FullCausal.calls += 1
        return causal(query, key, value)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name,params", [("pi", {"factor": 2.0}), ("dynamic_ntk", {}), ("yarn", {"factor": 2.0})])
def test_pattern_runs_only_in_training_and_matches_full_attention(attn, name, params):
    ids = torch.randint(3, 97, (2, 48))
    reference = make_tiny("llama", attn=attn)
    rope_ext.patch(reference, name, **params)
    model = make_tiny("llama", attn=attn)
    rope_ext.patch(model, name, train_attention=FullCausal(), **params)
    FullCausal.calls = 0
    model.eval()
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5) and FullCausal.calls == 0
    model.train()
    reference.train()
    loss = model(ids, labels=ids).loss
    assert FullCausal.calls == 2 and torch.allclose(loss, reference(ids, labels=ids).loss, atol=1e-5)
    loss.backward()


def test_pattern_refuses_padding_and_attention_methods():
    model = make_tiny("llama").train()
    rope_ext.patch(model, "pi", factor=2.0, train_attention=FullCausal())
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="train_attention .*needs unpadded, packed batches"):
        model(torch.randint(3, 97, (2, 40)), attention_mask=mask)
    with pytest.raises(ValueError, match="frequency methods only"):
        rope_ext.patch(make_tiny("llama"), "rerope", window=8, train_attention=FullCausal())
    with pytest.raises(TypeError, match=r"train_attention must have an attend\(query, key, value, causal\) method"):
        rope_ext.patch(make_tiny("llama"), "pi", factor=2.0, train_attention=object())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pattern_keeps_the_sliding_window_of_mistral(attn):
    ids = torch.randint(3, 97, (2, 40))
    reference = make_tiny("mistral", attn=attn, sliding_window=8).train()
    rope_ext.patch(reference, "pi", factor=2.0)
    model = make_tiny("mistral", attn=attn, sliding_window=8).train()
    rope_ext.patch(model, "pi", factor=2.0, train_attention=FullCausal())
    FullCausal.calls = 0
    loss = model(ids, labels=ids).loss
    assert FullCausal.calls == 2 and torch.allclose(loss, reference(ids, labels=ids).loss, atol=1e-5)
