"""One source of every method's defaults: eval, the calculator and LongLoRA give the same parameters
for the same model and target length, and each method accepts its own defaults."""
from __future__ import annotations

import pytest
from conftest import TRAINED, make_tiny

import rope_ext
from rope_ext import calc
from rope_ext.eval.spec import resolve
from rope_ext.facts import rope_spec
from rope_ext.longlora.config import FinetuneConfig
from rope_ext.longlora.model import method_parameters
from rope_ext.methods import REGISTRY, names

LENGTHS = (TRAINED, 2 * TRAINED, 4 * TRAINED + 3)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.mark.parametrize("length", LENGTHS)
def test_eval_calc_and_longlora_agree(model, length):
    spec = rope_spec(model)
    recommended = {r.method: r.params for r in calc.recommend(length, spec.rotary_dim, spec.rope_theta, spec.trained_length)}
    for name in names():
        from_eval = resolve(name, {}, length, spec)
        assert from_eval == REGISTRY[name].defaults_for(spec, length)
        if name in recommended:
            shown = {k: v for k, v in recommended[name].items() if k in from_eval}
            assert shown == from_eval, name
        if REGISTRY[name].kind == "frequency" and length > TRAINED:
            config = FinetuneConfig(model="unused", data=("unused",), output_dir="unused", method=name, target_length=length)
            assert method_parameters(config, model) == from_eval, name


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("length", LENGTHS)
def test_every_method_patches_with_its_own_defaults(model, name, length):
    params = REGISTRY[name].defaults_for(rope_spec(model), length)
    with rope_ext.patched(model, name, **params) as handle:
        assert handle.method.name == name


def test_given_parameters_win_and_derived_ones_follow_them(model):
    spec = rope_spec(model)
    leaky = REGISTRY["leaky_rerope"].defaults_for(spec, 8 * TRAINED, window=4)
    assert leaky["window"] == 4 and leaky["k"] == pytest.approx(max(2.0, (8 * TRAINED - 1 - 4) / (TRAINED - 1 - 4)), abs=0.01)
    assert REGISTRY["yarn"].defaults_for(spec, 8 * TRAINED, target_length=100) == {"target_length": 100}
    assert REGISTRY["pi"].defaults_for(spec, 8 * TRAINED) == {"factor": 8.0}
    with pytest.raises(ValueError, match="target length must be an int >= 2"):
        REGISTRY["pi"].defaults_for(spec, 1)
