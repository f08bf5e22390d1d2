"""Recommended parameters: rope_ext.patch accepts every one on a tiny Llama, the model facts are read
as the patch reads them, and windowed methods keep every remapped distance inside the trained length."""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TRAINED, make_tiny

import rope_ext
from rope_ext import calc
from rope_ext.methods import REGISTRY
from rope_ext.methods.rerope import leaky_rerope_relative
from rope_ext.methods.self_extend import self_extend_relative


@pytest.mark.parametrize("target", [16, 4 * TRAINED])
def test_every_recommendation_is_accepted_by_patch(target):
    model = make_tiny("llama")
    family, spec = calc.model_rope_spec(model.config)
    recs = calc.recommend(target, spec.rotary_dim, spec.rope_theta, spec.trained_length)
    assert [r.method for r in recs] == list(calc.RECOMMENDED_METHODS)
    assert set(calc.RECOMMENDED_METHODS) == {n for n, cls in REGISTRY.items() if cls.for_pretrained_rope} - {"none", "dilated", "block_memory"}  # dilated cuts cost, it does not extend the reach; which blocks block_memory attends depends on its lookup, not on a formula of its parameters
    ids = torch.randint(3, 97, (1, target))
    with torch.no_grad():
        for rec in recs:
            with rope_ext.patched(model, rec.method, **rec.params) as handle:
                assert handle.method.name == rec.method
                assert handle.method.trained_length == TRAINED
                assert torch.isfinite(model(ids).logits).all()
            assert rope_ext.current(model) is None


def test_model_rope_spec_is_what_patch_uses():
    model = make_tiny("phi3")                               # partial rotary
    family, spec = calc.model_rope_spec(model.config)
    handle = rope_ext.patch(model, "pi", factor=2.0)
    assert family == handle.family
    assert spec == next(iter(handle.specs.values()))
    assert spec.rotary_dim < spec.head_dim


@pytest.mark.parametrize("target, trained", [(100, 32), (4096 * 16, 4096), (33, 32), (1000, 9)])
def test_windowed_recommendations_keep_distances_inside_trained_length(target, trained):
    recs = {r.method: r for r in calc.recommend(target, 64, 1e4, trained)}
    rel = torch.arange(target)
    w, k = recs["leaky_rerope"].params["window"], recs["leaky_rerope"].params["k"]
    assert w < trained and k > 1
    assert leaky_rerope_relative(rel, w, k).max() <= trained - 1
    G, w = recs["self_extend"].params["group_size"], recs["self_extend"].params["window"]
    q, kk = torch.arange(target)[:, None], torch.arange(min(target, 256))[None, :]   # the largest distances start at k < G
    causal = kk <= q

    def worst(g: int) -> int:
        return int(self_extend_relative(q, kk, g, w)[causal].max())

    assert worst(G) <= trained - 1
    if G > 1:
        assert worst(G - 1) > trained - 1                 # the smallest group that fits
    assert recs["rerope"].params["window"] < trained


def test_frequency_factor_is_the_length_ratio():
    recs = {r.method: r for r in calc.recommend(32768, 64, 1e5, 8192)}
    for name in ("pi", "ntk", "ntk_by_parts", "yarn", "llama3"):
        assert recs[name].params["factor"] == 4.0
    assert recs["ntk"].facts["new_base"] == pytest.approx(calc.ntk_base_for_factor(1e5, 4.0, 64))
    facts = recs["ntk"].facts
    assert calc.extrapolation_limit(64, facts["critical_dim"], facts["liu_base"]) == pytest.approx(32768)


def test_config_rope_spec_for_unsupported_deepseek():
    config = transformers.DeepseekV3Config()
    spec, family, why = calc.rope_spec_of(config)
    assert family is None and "deepseek" in why.lower()
    assert (spec.rotary_dim, spec.rope_theta, spec.trained_length) == (64, 10000.0, 4096)


@pytest.mark.parametrize("args, text", [
    ((0, 64, 1e4, 32), "target_length must be at least 1 token, got 0"),
    ((100, 63, 1e4, 32), "rotary_dim must be a positive even integer .*got 63"),
    ((100, 64, 0.5, 32), r"rope_theta must be > 1, got 0.5$"),
    ((100, 64, 1e4, 3), "trained_length must be >= 4 tokens to recommend a window, got 3"),
])
def test_bad_input_names_the_value(args, text):
    with pytest.raises(ValueError, match=text):
        calc.recommend(*args)
