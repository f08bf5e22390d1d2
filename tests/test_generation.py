"""With the KV cache, every method gives the logits of recomputing the whole sequence (keys are
cached unrotated where the method re-rotates them), at batch 2 with left padding; padding changes
no real token's output; training steps work under every method."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_patch_identity import EXTEND

import rope_ext
from rope_ext._compat import cache_kwarg

FAMILIES = [("llama", "sdpa"), ("phi3", "sdpa"), ("gemma2", "eager")]


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family,attn", FAMILIES)
@pytest.mark.parametrize("name,params", EXTEND, ids=[n for n, _ in EXTEND])
def test_cached_decode_equals_full_recompute(family, attn, name, params):
    """Dynamic methods re-rotate every cached key with the current length's base (YaRN sec. 3.3:
    cache keys before RoPE). Deeper layers' cached states were still computed at their own step's
    length, as in every cached dynamic-scaling implementation, so for them the exact comparison is
    on one layer; transformers' own dynamic rope fails it (stale keys), see the test below."""
    from transformers import DynamicCache

    dynamic = rope_ext.methods.get(name).kind == "frequency" and rope_ext.methods.get(name).rotation == "deferred"
    model = make_tiny(family, attn=attn, num_hidden_layers=1 if dynamic else 2)
    torch.manual_seed(1)
    B, L, steps = 2, 56, 6
    ids = torch.randint(3, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :5] = 0
    ids[0, :5] = 0
    pos = positions(mask)
    with torch.inference_mode(), rope_ext.patched(model, name, **params):
        cache = DynamicCache(config=model.config)
        prefix = L - steps
        model(ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=pos[:, :prefix], **{cache_kwarg(model): cache}, use_cache=True)
        for t in range(prefix, L):
            step = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                         **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
            full = model(ids[:, :t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, :t + 1]).logits[:, -1]
            err = (step - full).abs().max().item()
            assert err <= 1e-4, f"{name} on {family}: step {t}: {err:.2e}"


def test_transformers_native_dynamic_has_stale_keys_and_ours_does_not():
    from transformers import DynamicCache

    ids = torch.randint(3, 97, (1, 60))
    errors = {}
    for label in ("native", "rope_ext"):
        if label == "native":
            model = make_tiny("llama", num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0})
        else:
            model = make_tiny("llama", num_hidden_layers=1)
            rope_ext.patch(model, "dynamic_ntk")
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(ids[:, :33], **{cache_kwarg(model): cache}, use_cache=True)
            for t in range(33, 60):
                step = model(ids[:, t:t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
            errors[label] = (step - model(ids).logits[:, -1]).abs().max().item()
    assert errors["rope_ext"] <= 1e-5 and errors["native"] > 20 * errors["rope_ext"], errors


@pytest.mark.parametrize("name,params", [("rerope", {"window": 8}), ("dynamic_ntk", {}), ("yarn", {"factor": 4.0}), ("alibi", {})])
def test_padding_changes_no_real_token(name, params):
    model = make_tiny("llama")
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (1, 50))
    with torch.inference_mode(), rope_ext.patched(model, name, **params):
        alone = model(ids).logits
        for side in ("left", "right"):
            pad = torch.zeros(1, 7, dtype=torch.long)
            padded = torch.cat([pad, ids] if side == "left" else [ids, pad], 1)
            mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)] if side == "left" else [torch.ones_like(ids), torch.zeros_like(pad)], 1)
            other = torch.randint(3, 97, (1, 50))  # same real length: dynamic methods see the same max position
            batch = torch.cat([padded, torch.cat([pad, other] if side == "left" else [other, pad], 1)])
            bmask = torch.cat([mask, mask])
            out = model(batch, attention_mask=bmask, position_ids=positions(bmask)).logits[0]
            real = out[7:] if side == "left" else out[:50]
            assert torch.allclose(real, alone[0], atol=1e-4), side


def test_generate_runs_with_cache_for_attention_methods():
    model = make_tiny("qwen2")
    ids = torch.randint(3, 97, (2, 40))
    with rope_ext.patched(model, "rerope", window=8):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = ids
        for _ in range(6):
            nxt = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name,params", EXTEND, ids=[n for n, _ in EXTEND])
def test_training_step_under_every_method(name, params):
    model = make_tiny("llama").train()
    ids = torch.randint(3, 97, (2, 60))
    rope_ext.patch(model, name, **params)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
