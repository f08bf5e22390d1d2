"""Save / reload round trips (issue 19): a patched model saved with ``rope_ext.save_pretrained`` and
loaded back with ``rope_ext.load`` is the same patched model.

Every registered method (read from the registry at collection) with its own ``defaults_for`` at 96
tokens (3x the trained 32, past every default window), plus log-n and attention sinks, on Llama and
on Gemma 3. Gemma 3 rather than Phi-3: its config holds one ``rope_parameters`` table per layer type
(local layers have their own base), so saving must rewrite every table and loading must restore each
one (``patch._write_config``, ``models._restore_rope_parameters``), while Phi-3's partial rotary is
one number the saved table keeps as it is. Phi-3 gets one test of its own below, because its config
refuses transformers' scaled rope types.

Checked, all bitwise (``torch.equal``) unless stated:
  * the reloaded model carries the same bound method (name, every parameter, RoPE specs, family);
  * its logits on the same seeded ids equal the saved model's (and its cached decoding, with sinks);
  * unpatching it gives the plain model's logits;
  * save warns "loads it UNPATCHED" exactly when the saved rope_parameters carry the rope_ext marker,
    and a checkpoint saved without it reproduces the logits with a plain transformers load (atol
    1e-5: transformers rotates by its own code path there; Llama only).
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import attn_for, main_spec, make_tiny, method_params
from torch import nn

import rope_ext
from rope_ext._compat import cache_kwarg
from rope_ext.methods import RopeSpec

LENGTH = 96
PREFIX = 40
FAMILIES = ("llama", "gemma3_text")
EXTRA = (("yarn", {"logn": True}), ("none", {"sinks": 2, "cache_window": 14}))

def case_id(family: str, name: str, given: dict[str, Any]) -> str:
    return "-".join([family, name, *(f"{k}={v}" for k, v in given.items())])


def tiny(family: str) -> nn.Module:
    return make_tiny(family, attn=attn_for(family))


def params_for(name: str, model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    return method_params(name, model, LENGTH, **given)


@functools.cache
def spec_of(family: str) -> RopeSpec:
    return main_spec(tiny(family))


def native_parameters(family: str, name: str, given: dict[str, Any]) -> dict[str, Any] | None:
    """The transformers rope_parameters save writes for the method (None: only the rope_ext block)."""
    model = tiny(family)
    method = rope_ext.methods.get(name)(**params_for(name, model, given)).bind(spec_of(family))
    return method.transformers_equivalent(spec_of(family))


def saved_natively(family: str, name: str, given: dict[str, Any]) -> bool:
    return native_parameters(family, name, given) is not None


def cases(families: tuple[str, ...] = FAMILIES) -> list[Any]:
    """pytest params (family, name, given): every registered method and the extra cases per family."""
    return [pytest.param(family, name, given, id=case_id(family, name, given))
            for family in families for name, given in [(n, {}) for n in rope_ext.methods.names()] + list(EXTRA)]


def ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, LENGTH), generator=torch.Generator().manual_seed(0))


def save(model: nn.Module, path: Path) -> bool:
    """Save with rope_ext; True when it warned that a plain transformers load gets the model unpatched."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rope_ext.save_pretrained(model, path)
    return any("UNPATCHED" in str(w.message) for w in caught)


def reload(path: Path, family: str) -> nn.Module:
    return rope_ext.load(path, tokenizer=False, attn_implementation=attn_for(family))[0]


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(ids()).logits


@torch.no_grad()
def decode(model: nn.Module) -> torch.Tensor:
    """Last-token logits of a cached decode: PREFIX tokens at once, then one token per step."""
    from transformers import DynamicCache

    tokens = ids()
    cache = DynamicCache(config=model.config)
    kwargs = {cache_kwarg(model): cache, "use_cache": True}
    steps = [model(tokens[:, :PREFIX], **kwargs).logits[:, -1]]
    steps += [model(tokens[:, t:t + 1], **kwargs).logits[:, -1] for t in range(PREFIX, LENGTH)]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("family,name,given", cases())
def test_reload_carries_the_method_and_its_logits(tmp_path, family, name, given):
    model = tiny(family)
    rope_ext.patch(model, name, **params_for(name, model, given))
    before = rope_ext.current(model)
    save(model, tmp_path)
    again = reload(tmp_path, family)
    after = rope_ext.current(again)
    assert after is not None, f"{name} was not re-applied by rope_ext.load"
    assert (after.name, after.family, after.specs) == (before.name, before.family, before.specs)
    assert after.method == before.method and after.method.params() == before.method.params()
    assert torch.equal(logits(again), logits(model)), f"{case_id(family, name, given)}: reloaded logits differ"
    if before.method.cache_policy() is not None:
        streamed = decode(again)
        assert torch.equal(streamed, decode(model)), f"{case_id(family, name, given)}: cached decoding differs"
        assert not torch.equal(streamed, decode(tiny(family))), "the reloaded cache policy evicted nothing"


@pytest.mark.parametrize("family,name,given", cases())
def test_unpatching_a_reloaded_model_gives_the_plain_model(tmp_path, family, name, given):
    model = tiny(family)
    plain = logits(model)
    rope_ext.patch(model, name, **params_for(name, model, given))
    save(model, tmp_path)
    again = reload(tmp_path, family)
    rope_ext.unpatch(again)
    assert rope_ext.current(again) is None and again.config._attn_implementation == attn_for(family)
    assert torch.equal(logits(again), plain), f"{case_id(family, name, given)}: unpatched reload is not the plain model"


@pytest.mark.parametrize("family,name,given", cases(families=("llama",)))
def test_a_checkpoint_warns_or_loads_patched_with_plain_transformers(tmp_path, family, name, given):
    """save warns exactly when the saved rope_parameters carry the rope_ext marker (a plain load then
    warns too); a checkpoint saved silently gives the patched logits with a plain transformers load."""
    from transformers import AutoModelForCausalLM

    model = tiny(family)
    rope_ext.patch(model, name, **params_for(name, model, given))
    warned = save(model, tmp_path)
    marked = "rope_ext" in json.dumps(json.loads((tmp_path / "config.json").read_text())["rope_parameters"])
    assert warned == marked, f"{name}{given}: warned={warned} but rope_ext marker in rope_parameters={marked}"
    if not warned:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation=attn_for(family)).eval()
        assert torch.allclose(logits(plain), logits(model), atol=1e-5), f"{name}{given}: saved silently, but a plain load differs"


def phi3_native_names() -> list[str]:
    """Methods that transformers also has: Phi3Config.validate_rope accepts only default / longrope,
    so those with a scaled rope_type must be saved as rope_ext's (with the UNPATCHED warning)."""
    return [name for name in rope_ext.methods.names() if native_parameters("phi3", name, {}) is not None]


@pytest.mark.parametrize("name", phi3_native_names())
def test_phi3_saves_and_reloads_methods_transformers_has(tmp_path, name):
    model = tiny("phi3")
    rope_ext.patch(model, name, **params_for(name, model, {}))
    warned = save(model, tmp_path)
    assert warned == (native_parameters("phi3", name, {})["rope_type"] != "default")
    again = reload(tmp_path, "phi3")
    assert rope_ext.current(again).method == rope_ext.current(model).method
    assert torch.equal(logits(again), logits(model))
