"""StreamingLLM attention sinks (Xiao et al. 2023) on any frequency method.

Reference, written here from the paper: after each step the cache holds the first ``sinks`` real
tokens and the last ``window`` tokens; the next token attends to those at positions 0..K-1 and to
itself at K. With ONE decoder layer a cached key depends only on its token, so the patched model's
logits must equal the unpatched model run on exactly those tokens at positions 0..K under
``reference_model`` (dense scores, the method's frequencies from its paper, no rope_ext code).
"""
from __future__ import annotations

import pytest
import torch
from conftest import TRAINED, make_tiny
from reference_model import reference_logits

import rope_ext
from rope_ext._compat import cache_kwarg

SINKS, WINDOW = 2, 6


def kept(tokens: list[int], sinks: int = SINKS, window: int = WINDOW) -> list[int]:
    return list(tokens) if len(tokens) <= sinks + window else tokens[:sinks] + tokens[len(tokens) - window:]


def dense_reference(model, method: str, params: dict, tokens: list[int]) -> torch.Tensor:
    """Last-token logits of ``tokens`` at positions 0..K under the method (reference_model: dense, from the papers)."""
    ids = torch.tensor([tokens])
    return reference_logits(model, method, params, ids, torch.ones_like(ids))[0, -1]


def out_cache(model, out):
    return getattr(out, cache_kwarg(model), None) or out.past_key_values


@pytest.mark.parametrize("method,params,window", [
    ("none", {}, WINDOW), ("yarn", {"factor": 2.0}, WINDOW), ("dynamic_ntk", {"factor": 2.0}, WINDOW),
    # a cache longer than the trained length: dynamic NTK's base then depends on the slots' absolute
    # values (the current length is the last slot + 1), not only on their differences. A batch shares
    # one dynamic base, its longest row's (as transformers' dynamic RoPE): only row 0 is that length
    ("dynamic_ntk", {"factor": 2.0}, 2 * TRAINED),
])
@torch.no_grad()
def test_each_step_equals_a_recompute_over_the_kept_tokens(method, params, window):
    reference = make_tiny("llama", num_hidden_layers=1, initializer_range=0.1)
    model = make_tiny("llama", num_hidden_layers=1, initializer_range=0.1)
    rope_ext.patch(model, method, sinks=SINKS, cache_window=window, **params)
    gen = torch.Generator().manual_seed(3)
    pad, total, prompt = 2, window + 18, 4
    streams = [torch.randint(3, 97, (total,), generator=gen).tolist(), torch.randint(3, 97, (total - pad,), generator=gen).tolist()]
    ids = torch.tensor([streams[0][:prompt], [0] * pad + streams[1][:prompt - pad]])
    mask = torch.tensor([[1] * prompt, [0] * pad + [1] * (prompt - pad)])
    key = cache_kwarg(model)
    cache = out_cache(model, model(ids, attention_mask=mask, use_cache=True))
    worst, effect = 0.0, 0.0
    for step in range(prompt, total):
        new = torch.tensor([[streams[0][step]], [streams[1][step - pad]]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        logits = model(new, attention_mask=mask, use_cache=True, **{key: cache}).logits[:, -1]
        rows = ((0, streams[0][:step]), (1, streams[1][:step - pad]))
        for row, seen in rows[:1] if window > TRAINED else rows:
            context = kept(seen, window=window) + [new[row, 0].item()]
            ref = dense_reference(reference, method, params, context)
            full = dense_reference(reference, method, params, seen + [new[row, 0].item()])
            worst = max(worst, (logits[row] - ref).abs().max().item())
            effect = max(effect, (full - ref).abs().max().item())
        assert all(layer.keys.shape[-2] <= SINKS + window for layer in cache.layers)
    assert worst <= 1e-4 and effect >= 100 * max(worst, 1e-6), (worst, effect)


@torch.no_grad()
def test_generation_keeps_the_cache_flat_over_ten_windows():
    model = make_tiny("llama")
    rope_ext.patch(model, "yarn", factor=2.0, sinks=SINKS, cache_window=WINDOW)
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    sizes = []
    for new in (2 * WINDOW, 10 * WINDOW):
        out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        cache = out_cache(model, out)
        assert cache.get_seq_length() == ids.shape[1] + new - 1
        sizes.append(sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers))
    assert sizes[0] == sizes[1]
    assert all(layer.keys.shape[-2] == SINKS + WINDOW for layer in cache.layers)


@torch.no_grad()
def test_a_cache_longer_than_the_stream_is_the_plain_model():
    plain, model = make_tiny("llama"), make_tiny("llama")
    rope_ext.patch(model, "none", sinks=4, cache_window=TRAINED - 4)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    want = plain.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, want.scores)) <= 1e-5


@pytest.mark.parametrize("params,message", [
    ({"sinks": -1, "cache_window": 8}, "sinks must be an integer >= 0"),
    ({"sinks": 4, "cache_window": 0}, "cache_window must be an integer >= 1"),
    ({"sinks": 4}, "give sinks and cache_window together"),
    ({"cache_window": 8}, "give sinks and cache_window together"),
    ({"sinks": 4.0, "cache_window": 8}, "sinks must be int"),
    ({"sinks": True, "cache_window": 8}, "sinks must be int"),
    ({"sinks": 4, "cache_window": TRAINED}, "sinks \\+ cache_window = 36 exceeds the 32 positions"),
])
def test_bad_sink_parameters_are_refused_and_leave_the_model_untouched(params, message):
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        rope_ext.patch(model, "none", **params)
    assert rope_ext.current(model) is None and "forward" not in model.__dict__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sinks_refuse_methods_that_change_attention_and_training_patterns():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="combine with plain RoPE and frequency methods"):
        rope_ext.patch(model, "rerope", window=8, sinks=4, cache_window=8)
    rope_ext.patch(model, "yarn", factor=4.0, sinks=4, cache_window=100)  # YaRN x4 reaches 128 positions
    rope_ext.unpatch(model)


@torch.no_grad()
def test_a_saved_sink_model_reloads_with_its_cache_and_warns_for_plain_loads(tmp_path):
    model = make_tiny("llama")
    rope_ext.patch(model, "yarn", factor=2.0, sinks=2, cache_window=6)
    with pytest.warns(UserWarning, match="loads it UNPATCHED"):
        rope_ext.save_pretrained(model, tmp_path)
    again = rope_ext.from_pretrained(tmp_path)
    assert rope_ext.current(again).method.cache_policy() == rope_ext.current(model).method.cache_policy()
    assert "rope_ext" in again.config.rope_parameters or "rope_ext" in str(again.config.rope_parameters)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(6))
    a = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    b = again.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@torch.no_grad()
def test_unpatch_after_streaming_is_bitwise():
    model = make_tiny("llama")
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(7))
    before = model(ids).logits
    rope_ext.patch(model, "ntk", factor=2.0, sinks=2, cache_window=6)
    model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    rope_ext.unpatch(model)
    assert "forward" not in model.__dict__ and torch.equal(model(ids).logits, before)
