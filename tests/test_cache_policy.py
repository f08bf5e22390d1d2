"""The cache-policy seam, shown with a toy policy defined here only: keep the first 2 real tokens and
the last N entries, attended at their slots among the kept real tokens (StreamingLLM's positions).

Adding a cache policy is one class (``KeepEnds``) and a method returning it: nothing in rope_ext
changes. The reference is written here independently: the kept tokens are chosen from the token
stream by the rule above, and the UNPATCHED model is run on them at positions 0..K; with one decoder
layer a cached key depends only on its token, so the patched model's logits must equal it.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from conftest import make_tiny

import rope_ext
from rope_ext._compat import cache_kwarg
from rope_ext.methods import REGISTRY, CachePolicy, Method, register

FIRST, LAST = 2, 5


class KeepEnds(CachePolicy):
    """Keep the first ``first`` real entries and the last ``last`` entries; slots as positions."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def keep(self, valid: torch.Tensor) -> torch.Tensor | None:
        n = valid.shape[1]
        if n <= self.first + self.last:
            return None
        index = torch.arange(n, device=valid.device).expand_as(valid)
        wanted = (valid & (valid.cumsum(1) <= self.first)) | (index >= n - self.last)
        score = (2 * wanted.long() + valid.long()) * n + index
        return score.topk(self.first + self.last, dim=1).indices.sort(dim=1).values

    def positions(self, absolute: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return (valid.long().cumsum(1) - 1).clamp(min=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyKeepEnds(Method):
    kind: ClassVar[str] = "attention"
    rotation: ClassVar[str] = "static"
    last: int = LAST

    def cache_policy(self) -> CachePolicy:
        return KeepEnds(FIRST, self.last)


@pytest.fixture
def toy():
    register("toy_keep_ends")(ToyKeepEnds)
    yield "toy_keep_ends"
    REGISTRY.pop("toy_keep_ends")


def kept_stream(tokens: list[int]) -> list[int]:
    """The toy rule on a stream of real tokens, written without the policy's code."""
    if len(tokens) <= FIRST + LAST:
        return list(tokens)
    return tokens[:FIRST] + tokens[-LAST:]


def reference_logits(plain, context: list[int]) -> torch.Tensor:
    ids = torch.tensor([context])
    return plain(ids, position_ids=torch.arange(len(context))[None]).logits[0, -1]


@torch.no_grad()
def test_stepwise_logits_equal_a_recompute_over_the_kept_tokens(toy):
    plain = make_tiny("llama", num_hidden_layers=1)
    model = make_tiny("llama", num_hidden_layers=1)
    rope_ext.patch(model, toy)
    torch.manual_seed(0)
    pad = 3
    streams = [torch.randint(3, 97, (20,)).tolist(), torch.randint(3, 97, (20 - pad,)).tolist()]
    prompt = 4
    ids = torch.tensor([streams[0][:prompt], [0] * pad + streams[1][:prompt - pad]])
    mask = torch.tensor([[1] * prompt, [0] * pad + [1] * (prompt - pad)])
    key = cache_kwarg(model)
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = getattr(out, key, None) or out.past_key_values
    worst = 0.0
    for step in range(prompt, 20):
        new = torch.tensor([[streams[0][step]], [streams[1][step - pad]]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        out = model(new, attention_mask=mask, use_cache=True, **{key: cache})
        for row, seen in ((0, streams[0][:step]), (1, streams[1][:step - pad])):
            ref = reference_logits(plain, kept_stream(seen) + [new[row, 0].item()])
            worst = max(worst, (out.logits[row, -1] - ref).abs().max().item())
        assert all(layer.keys.shape[-2] <= FIRST + LAST for layer in cache.layers)
    assert worst <= 1e-4, worst


@torch.no_grad()
def test_generate_runs_with_a_bounded_cache_and_unpatch_is_bitwise(toy):
    model = make_tiny("llama")
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    before = model(ids).logits
    forward_before = model.__dict__.get("forward")
    rope_ext.patch(model, toy)
    out = model.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (2, 46)
    cache = getattr(out, cache_kwarg(model), None) or out.past_key_values
    assert cache.get_seq_length() == 45
    assert all(layer.keys.shape[-2] == FIRST + LAST for layer in cache.layers)
    rope_ext.unpatch(model)
    assert model.__dict__.get("forward") is forward_before
    assert torch.equal(model(ids).logits, before)


@torch.no_grad()
def test_a_filled_foreign_cache_is_refused(toy):
    model = make_tiny("llama")
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    key = cache_kwarg(model)
    out = model(ids, use_cache=True)
    cache = getattr(out, key, None) or out.past_key_values
    rope_ext.patch(model, toy)
    with pytest.raises(ValueError, match="KeepEnds needs a transformers Cache"):
        model(ids[:, -1:], use_cache=True, **{key: cache})
