"""A patch made for a target length sets ``config.max_position_embeddings`` to it (issue 17): what
transformers' generation, lm-eval's ``hf`` model and serving engines read as the model's length.
Restored on unpatch, written on save, restored by ``rope_ext.load`` before it re-applies the method,
and a patched config is read as the original model (trained length, base) when it is patched again.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM

import rope_ext
from rope_ext.facts import trained_length

TRAINED = 32  # make_tiny's max_position_embeddings


def _trained_config_length() -> int:
    model = make_tiny()
    assert model.config.max_position_embeddings == TRAINED
    return TRAINED


@pytest.mark.parametrize(("method", "params", "expected"), [
    ("pi", {"factor": 4}, 4 * TRAINED),
    ("ntk", {"factor": 2.5}, 80),
    ("ntk_by_parts", {"target_length": 100}, 100),
    ("yarn", {"factor": 8}, 8 * TRAINED),
    ("yarn", {"target_length": 77}, 77),
    ("llama3", {"factor": 3}, 3 * TRAINED),
])
def test_scaled_methods_set_the_target_length(method: str, params: dict, expected: int) -> None:
    model = make_tiny()
    original = _trained_config_length()
    rope_ext.patch(model, method, **params)
    assert model.config.max_position_embeddings == expected
    assert trained_length(model.config) == original, "the patched config still reads as trained at 32"
    rope_ext.unpatch(model)
    assert model.config.max_position_embeddings == original
    assert not hasattr(model.config, "rope_ext")


@pytest.mark.parametrize(("method", "params"), [
    ("none", {}), ("ntk", {"base": 50000.0}), ("dynamic_ntk", {"factor": 2}), ("dynamic_yarn", {"factor": 1}),
    ("rerope", {"window": 8}), ("leaky_rerope", {"window": 8, "k": 4}), ("self_extend", {"group_size": 4, "window": 8}),
])
def test_methods_without_a_target_length_keep_it(method: str, params: dict) -> None:
    model = make_tiny()
    rope_ext.patch(model, method, **params)
    assert model.config.max_position_embeddings == TRAINED
    assert model.config.rope_ext["original_max_position_embeddings"] == TRAINED


def test_replacing_a_patch_binds_to_the_original_model() -> None:
    """Patching over an NTK patch must read the original base and trained length, not the patched ones."""
    fresh, model = make_tiny(), make_tiny()
    expected = rope_ext.patch(fresh, "yarn", factor=2).specs
    rope_ext.patch(model, "ntk", factor=3)
    assert model.config.rope_parameters["rope_theta"] != fresh.config.rope_ext["original_rope_parameters"]["rope_theta"]
    assert rope_ext.patch(model, "yarn", factor=2, replace=True).specs == expected
    ids = torch.randint(0, fresh.config.vocab_size, (1, 3 * TRAINED), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert model.config.max_position_embeddings == 2 * TRAINED


def test_saved_length_is_the_target_and_load_restores_the_original(tmp_path) -> None:
    model = make_tiny()
    rope_ext.patch(model, "yarn", factor=4)
    rope_ext.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_position_embeddings"] == 4 * TRAINED
    assert saved["rope_ext"]["original_max_position_embeddings"] == TRAINED

    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert plain.config.max_position_embeddings == 4 * TRAINED
    assert plain.config.rope_parameters["original_max_position_embeddings"] == TRAINED

    reloaded = rope_ext.from_pretrained(tmp_path)
    assert reloaded.config.max_position_embeddings == 4 * TRAINED
    assert rope_ext.current(reloaded).method.trained_length == TRAINED
    rope_ext.unpatch(reloaded)
    assert reloaded.config.max_position_embeddings == TRAINED


def test_a_damaged_saved_length_is_refused(tmp_path) -> None:
    model = make_tiny()
    rope_ext.patch(model, "pi", factor=2)
    rope_ext.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_ext"]["original_max_position_embeddings"] = "32"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="original_max_position_embeddings must be a positive integer"):
        rope_ext.from_pretrained(tmp_path)
