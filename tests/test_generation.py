"""With the KV cache, every method gives the logits of recomputing the whole sequence (keys are
cached unrotated where the method re-rotates them), at batch 2 with left padding; padding changes
no real token's output; training steps work under every method."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from registry_suite import case_id, check_cached_generation_equals_recompute, check_training_step, extend_cases, positions

import rope_ext
from rope_ext._compat import cache_kwarg

FAMILIES = ["llama", "phi3", "gemma2"]  # plain, partial rotary, softcapped eager attention


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", extend_cases(), ids=case_id)
def test_cached_decode_equals_full_recompute(family, case):
    name, params = case
    check_cached_generation_equals_recompute(name, family, params)


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


@pytest.mark.parametrize("case", extend_cases(), ids=case_id)
def test_training_step_under_every_method(case):
    name, params = case
    check_training_step(name, "llama", params)
