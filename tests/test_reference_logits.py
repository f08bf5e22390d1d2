"""Every registered method on every registered family, past its window and past the trained length,
against the independent dense reference of ``reference_model`` (written from the papers).

Each case states its tolerance and the method's measured effect on the same logits (patched minus
unpatched): the effect must be at least ``EFFECT_OVER_TOL`` times the tolerance, so a test that
passes cannot be passing because the method changed nothing. Plain RoPE (``none``) has no effect:
for it the check is that the reference reproduces the unpatched model on that family.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FAMILIES, METHODS, TRAINED, attn_for, make_tiny, method_params
from reference_model import frequencies, reference_logits, rope_theta

import rope_ext
from rope_ext.patches import FAMILIES as FAMILY_REGISTRY

LENGTH = 96  # 3x the trained length, 6x the default window (TRAINED // 2)
TOL = 2e-5
EFFECT_OVER_TOL = 100
SENSITIVE = dict(initializer_range=0.1)  # attention peaky enough that a method's effect is far above TOL


def cases() -> list[tuple[str, dict[str, Any] | None, str]]:
    """(method, params or None for its defaults_for, family): attention methods where the family has
    AttentionInterface, every method plus log-n on plain RoPE and on YaRN."""
    out = []
    for family in FAMILIES:
        hooks = FAMILY_REGISTRY[family].attention_interface
        for name in METHODS:
            if hooks or rope_ext.methods.get(name).kind == "frequency" and rope_ext.methods.get(name).rotation == "static":
                out.append((name, None, family))
        if hooks:
            out += [("none", {"logn": True}, family), ("rerope", {"logn": True}, family)]
    return out


def case_id(case: tuple[str, dict[str, Any] | None, str]) -> str:
    name, params, family = case
    return f"{family}-{name}" + ("-logn" if params and params.get("logn") else "")


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2: a full row and a row left-padded by 7 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, LENGTH), generator=g)
    padding = torch.ones(2, LENGTH, dtype=torch.long)
    padding[1, :7] = 0
    ids[1, :7] = 0
    return ids, padding


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_patched_logits_equal_the_dense_reference(case):
    name, given, family = case
    model = make_tiny(family, attn=attn_for(family), **SENSITIVE)
    params = method_params(name, model, LENGTH, **(given or {}))
    ids, padding = inputs()
    real = padding.bool()
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(ids, attention_mask=padding, position_ids=positions).logits
        hooks = FAMILY_REGISTRY[family].attention_interface
        expected = reference_logits(model, name, params, ids, padding, attention=hooks)
        with rope_ext.patched(model, name, **params):
            got = model(ids, attention_mask=padding, position_ids=positions).logits
    err = (got - expected)[real].abs().max().item()
    effect = (got - plain)[real].abs().max().item()
    assert err <= TOL, f"{name}{params} on {family}: max |patched - reference| = {err:.2e} > {TOL:.0e} (effect {effect:.2e})"
    if name == "none" and not params.get("logn"):
        assert effect == 0.0
    else:
        assert effect >= EFFECT_OVER_TOL * TOL, f"{name}{params} on {family}: effect {effect:.2e} < {EFFECT_OVER_TOL} x tolerance"


def patched_and_reference(name: str, family: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """(patched logits in ``dtype``, unpatched logits in ``dtype``, fp32-model reference, real-token mask)."""
    ids, padding = inputs()
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    reference_model = make_tiny(family, attn=attn, **SENSITIVE)
    model = make_tiny(family, attn=attn, dtype=dtype, **SENSITIVE)
    params = method_params(name, model, LENGTH)
    with torch.no_grad():
        expected = reference_logits(reference_model, name, params, ids, padding)
        plain = model(ids, attention_mask=padding, position_ids=positions).logits.float()
        with rope_ext.patched(model, name, **params):
            got = model(ids, attention_mask=padding, position_ids=positions).logits.float()
    return got, plain, expected, padding.bool()


@pytest.mark.parametrize("name", ["rerope", "leaky_rerope", "self_extend", "yarn"])
def test_eager_and_sdpa_bases_both_equal_the_reference(name):
    for attn in ("eager", "sdpa"):
        got, plain, expected, real = patched_and_reference(name, attn=attn)
        assert (got - expected)[real].abs().max() <= TOL, f"{name} over {attn}"
        assert (got - plain)[real].abs().max() >= EFFECT_OVER_TOL * TOL


BF16_TOL = 0.08  # bf16 rounding of this model's logits (std ~0.8): max |error| measured 0.035 - 0.05
BF16_EFFECT_OVER_TOL = 10  # measured effects 1.5 - 2.1, i.e. >= 19x the tolerance


@pytest.mark.parametrize("name", ["rerope", "leaky_rerope", "self_extend", "yarn", "pi"])
def test_bfloat16_is_within_its_rounding_of_the_reference(name):
    """A bf16 model patched with the method is within bf16 rounding of the float64 reference, and
    the unpatched bf16 model is >= 10x that tolerance away from it: the test sees the method applied."""
    got, plain, expected, real = patched_and_reference(name, dtype=torch.bfloat16)
    err, effect = (got - expected)[real].abs().max().item(), (plain - expected)[real].abs().max().item()
    assert err <= BF16_TOL and effect >= BF16_EFFECT_OVER_TOL * BF16_TOL, (err, effect)


@pytest.mark.parametrize("name", ["ntk_by_parts", "llama3", "yarn"])
def test_the_tiny_models_frequencies_reach_into_each_ramps_band(name):
    """The cases above check the blend between kept and interpolated frequencies only if some
    theta_f of the tiny model (d = 16, b = 10^4, L0 = 32) falls strictly inside the ramp."""
    model = make_tiny("llama")
    params = method_params(name, model, LENGTH)
    theta = rope_theta(10000.0, 16)
    blended, _ = frequencies(name, params, 10000.0, 16, TRAINED, LENGTH)
    s = params["factor"]
    inside = ~torch.isclose(blended, theta) & ~torch.isclose(blended, theta / s)
    assert inside.any() and (blended <= theta).all() and (blended >= theta / s - 1e-12).all(), blended / theta


@pytest.mark.parametrize("name", ["rerope", "leaky_rerope", "self_extend"])
@pytest.mark.parametrize("extra", [1, 2, 3])
def test_windowed_methods_at_the_windows_edge_equal_the_reference(name, extra):
    """Inputs just past the window (L = w + 1 .. w + 3): the farthest keys are the first remapped
    ones, where a window off by one would show (distance w maps to w in all three methods, so the
    first visible change is at w + 1)."""
    model = make_tiny("llama", **SENSITIVE)
    window = method_params(name, model, LENGTH)["window"]
    length = window + extra
    params = method_params(name, model, LENGTH)
    ids = torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(extra))
    padding = torch.ones_like(ids)
    with torch.no_grad():
        expected = reference_logits(model, name, params, ids, padding)
        with rope_ext.patched(model, name, **params):
            got = model(ids).logits
    assert (got - expected).abs().max() <= TOL, f"{name} at length w + {extra}"
