"""The shared suite's lists come from the registries: every registered family builds a tiny model
whose rotary module its Family finds, and a method registered at run time runs the shared checks
without any list being edited."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import FAMILIES, OVERRIDES, attn_for, make_tiny
from registry_suite import check_cached_generation_equals_recompute, check_patch_unpatch_bitwise, extend_cases, method_names

import rope_ext
from rope_ext.methods.base import check_number, rope_inv_freq

TOY = "toy_half_theta"


def test_families_and_overrides_are_the_registry():
    assert FAMILIES == sorted(rope_ext.patches.FAMILIES)
    assert set(OVERRIDES) <= set(FAMILIES), f"overrides for unregistered families: {set(OVERRIDES) - set(FAMILIES)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_family_builds_a_tiny_model_with_rotary(family):
    model = make_tiny(family, attn=attn_for(family))
    assert model.config.model_type == family and model.config.num_hidden_layers == 2
    assert rope_ext.patches.family_for(model) is rope_ext.patches.FAMILIES[family]
    rotaries = rope_ext.patches.FAMILIES[family].rotary_modules(model)
    assert len(rotaries) >= 1 and all(isinstance(r, torch.nn.Module) for r in rotaries)


@pytest.fixture
def toy_method():
    """A frequency method registered only for this test: theta_i / divisor (divisor 2 by default)."""

    @rope_ext.methods.register(TOY)
    @dataclass(frozen=True, kw_only=True)
    class HalfTheta(rope_ext.methods.Method):
        summary = "test-only: plain RoPE frequencies divided by a divisor"
        divisor: float

        def __post_init__(self) -> None:
            super().__post_init__()
            check_number(self, "divisor", above=0.0)

        @classmethod
        def defaults_for(cls, spec: rope_ext.methods.RopeSpec, length: int, **given: Any) -> dict[str, Any]:
            params = super().defaults_for(spec, length, **given)
            params.setdefault("divisor", 2.0)
            return params

        def frequencies(self, spec: rope_ext.methods.RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
            return rope_inv_freq(spec.rope_theta, spec.rotary_dim) / self.divisor, 1.0

    yield HalfTheta
    rope_ext.methods.REGISTRY.pop(TOY)


def test_a_newly_registered_method_runs_the_shared_suite(toy_method):
    assert TOY in method_names() and (TOY, None) in extend_cases()
    for family in ("llama", "phi3"):
        check_patch_unpatch_bitwise(TOY, family)
        check_cached_generation_equals_recompute(TOY, family)
    model = make_tiny("llama")
    with rope_ext.patched(model, TOY, divisor=2.0):
        rotary = rope_ext.patches.FAMILIES["llama"].rotary_modules(model)[0]
        assert torch.equal(rotary.inv_freq, rope_inv_freq(10000.0, 16) / 2)


def test_the_toy_is_gone_after_its_fixture():
    assert TOY not in method_names()
