"""The shared checks every registered method runs on every registered family. Plain functions of
``(name, family)``: the parametrized tests call them over the registries' lists, and a method or
family registered later (even inside a test) runs through the same checks without editing a list.
Parameters come from the method's own ``defaults_for`` (conftest.method_params) unless given."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import attn_for, main_spec, make_tiny, method_params

import rope_ext
from rope_ext._compat import cache_kwarg
from rope_ext.methods.base import rope_inv_freq

EXTEND_LENGTH = 80
IDENTITY_LENGTH = 20
LOGN_CASE = ("none", {"logn": True})  # logn=True works on any method; plain RoPE isolates it


def method_names() -> list[str]:
    """Every registered method, read from the registry now (not at import)."""
    return rope_ext.methods.names()


def identity_method_names() -> list[str]:
    """Methods for a pretrained RoPE model: each has an identity case (factor 1 / window >= length)."""
    return [n for n in method_names() if rope_ext.methods.get(n).for_pretrained_rope]


def extend_cases() -> list[tuple[str, dict[str, Any] | None]]:
    """(name, params) per registered method (None: its defaults_for), plus log-n scaling."""
    return [(n, None) for n in method_names()] + [LOGN_CASE]


def case_id(case: tuple[str, dict[str, Any] | None]) -> str:
    name, params = case
    return name if not params else name + "-" + "-".join(f"{k}={v}" for k, v in params.items())


def snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return state, buffers, model.config.to_json_string(), model.config._attn_implementation


def assert_same(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a[2:] == b[2:]


def identity_params(name: str, model, length: int) -> dict[str, Any]:
    """defaults_for at a length inside the trained one (factor 1), with any window covering it."""
    fields = {f.name for f in dataclasses.fields(rope_ext.methods.get(name))}
    return method_params(name, model, length, **({"window": length} if "window" in fields else {}))


def is_plain_rope(method, model, length: int) -> bool:
    """True when a bound method changes nothing at ``length``: plain RoPE frequencies, no attention."""
    spec = main_spec(model)
    bound = method.bind(spec)
    inv_freq, scaling = bound.frequencies(spec, length)
    return (not bound.needs_attention_hook and scaling == 1.0
            and torch.equal(inv_freq, rope_inv_freq(spec.rope_theta, spec.rotary_dim)))


def check_identity_bitwise(name: str, family: str) -> None:
    """The identity case gives the model's logits bitwise, and unpatch restores every bit."""
    model = make_tiny(family, attn=attn_for(family))
    ids = torch.randint(3, 97, (2, IDENTITY_LENGTH))
    ref = model(ids).logits
    before = snapshot(model)
    with rope_ext.patched(model, name, **identity_params(name, model, IDENTITY_LENGTH)):
        assert torch.equal(model(ids).logits, ref), f"{name} identity is not bitwise on {family}"
    assert rope_ext.current(model) is None
    assert torch.equal(model(ids).logits, ref)
    assert_same(before, snapshot(model))


def check_patch_unpatch_bitwise(name: str, family: str, params: dict[str, Any] | None = None) -> None:
    """Past the trained length the method runs (finite, changed logits unless it is plain RoPE there)
    and unpatch is bitwise; a family without AttentionInterface refuses a method that needs it,
    untouched."""
    model = make_tiny(family, attn=attn_for(family))
    ids = torch.randint(3, 97, (2, EXTEND_LENGTH))
    params = method_params(name, model, EXTEND_LENGTH) if params is None else params
    ref = model(ids).logits
    before = snapshot(model)
    method = rope_ext.methods.get(name)(**params)
    if method.needs_attention_hook and not rope_ext.patches.FAMILIES[family].attention_interface:
        with pytest.raises(ValueError, match=rf"{name} changes attention, but {family} does not use transformers' AttentionInterface"):
            rope_ext.patch(model, name, **params)
        assert_same(before, snapshot(model))
        return
    rope_ext.patch(model, name, **params)
    out = model(ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if is_plain_rope(method, model, EXTEND_LENGTH):
        assert torch.equal(out, ref), f"{name}{params} is plain RoPE but changed the logits on {family}"
    else:
        assert not torch.equal(out, ref), f"{name}{params} changed nothing on {family}"
    rope_ext.unpatch(model)
    assert torch.equal(model(ids).logits, ref)
    assert_same(before, snapshot(model))


def check_cached_generation_equals_recompute(name: str, family: str, params: dict[str, Any] | None = None) -> None:
    """Cached decoding at batch 2 with left padding gives the logits of recomputing the sequence.

    Dynamic methods re-rotate every cached key with the current length's base (YaRN sec. 3.3: cache
    keys before RoPE). Deeper layers' cached states were still computed at their own step's length,
    as in every cached dynamic-scaling implementation, so for them the exact comparison is on one
    layer."""
    from transformers import DynamicCache

    cls = rope_ext.methods.get(name)
    dynamic = cls.kind == "frequency" and cls.rotation == "deferred"
    model = make_tiny(family, attn=attn_for(family), num_hidden_layers=1 if dynamic else 2)
    torch.manual_seed(1)
    B, L, steps = 2, 56, 6
    params = method_params(name, model, L) if params is None else params
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


def check_training_step(name: str, family: str, params: dict[str, Any] | None = None) -> None:
    """A training step under the method gives a finite loss and finite, non-zero gradients."""
    model = make_tiny(family, attn=attn_for(family)).train()
    ids = torch.randint(3, 97, (2, 60))
    rope_ext.patch(model, name, **(method_params(name, model, 60) if params is None else params))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)
