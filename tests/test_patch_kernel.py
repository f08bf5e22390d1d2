"""The patch's kernel choices: the merged two-part path inside a patched model equals the
query-blocked reference, and kernel="triton" equals "torch" inside a patched model -- on a CUDA
model with the compiled kernel where CUDA is present, else on a CPU model under Triton's
interpreter in a fresh process (tests/kernel_device.py)."""
from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

import rope_ext
from rope_ext import attention, fused_rotary, rotary
from conftest import make_tiny
from kernel_device import kernel_device, needs_triton, rerun_interpreted, triton_here


def _runtimes(model: torch.nn.Module) -> list[attention.Runtime]:
    return list({id(m.rope_ext_runtime): m.rope_ext_runtime for m in model.modules() if hasattr(m, "rope_ext_runtime")}.values())


def _padded_batch(vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,params", [("rerope", {"window": 8}), ("leaky_rerope", {"window": 8, "k": 4.0})])
def test_merged_two_part_equals_reference_in_a_patched_model(attn: str, method: str, params: dict[str, Any]) -> None:
    model = make_tiny("llama", attn=attn)
    ids, mask = _padded_batch(model.config.vocab_size, 40)
    with rope_ext.patched(model, method, **params), torch.no_grad():
        assert all(rt.two_part_impl == "merged" for rt in _runtimes(model))
        merged = model(ids, attention_mask=mask).logits
        for rt in _runtimes(model):
            rt.two_part_impl = "reference"
        reference = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(merged[mask.bool()], reference[mask.bool()], atol=2e-5, rtol=1e-5)


@needs_triton
def test_triton_kernel_off_cuda_is_refused_and_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_tiny("llama")
    with pytest.raises(ValueError, match=r"kernel='triton' needs CUDA tensors \(got cpu\)"):
        rope_ext.patch(model, "rerope", window=8, kernel="triton")
    assert rope_ext.current(model) is None


IN_MODEL = [("llama", "rerope", {"window": 8}), ("llama", "dynamic_ntk", {"factor": 4.0}), ("llama", "yarn", {"factor": 2.0}),
            ("gpt_neox", "pi", {"factor": 2.0}), ("phi3", "ntk", {"factor": 2.0})]


@pytest.mark.slow
def test_fresh_process_runs_the_in_model_triton_tests() -> None:
    rerun_interpreted(f"{__file__}::test_triton_kernel_in_a_patched_model_equals_torch")


@triton_here
@pytest.mark.parametrize("family,method,params", IN_MODEL, ids=[f"{f}-{m}" for f, m, _ in IN_MODEL])
def test_triton_kernel_in_a_patched_model_equals_torch(monkeypatch: pytest.MonkeyPatch, family: str, method: str,
                                                       params: dict[str, Any]) -> None:
    """Static methods send q and k to the kernel from the modeling file's ``apply_rotary_pos_emb``
    (one call per layer), the others from rope_ext's attention function; "torch" calls neither;
    an unpatched model of the same family is untouched throughout."""
    device = kernel_device()
    calls: dict[str, list[str | None]] = {"modeling": [], "attention": []}

    def counting(where: str, plain: Any) -> Any:
        def apply(*args: Any, **kwargs: Any) -> Any:
            calls[where].append(kwargs.get("kernel"))
            return plain(*args, **kwargs)
        return apply

    monkeypatch.setattr(rotary, "apply_rotary", counting("modeling", rotary.apply_rotary))
    monkeypatch.setattr(attention, "apply_rotary", counting("attention", attention.apply_rotary))
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    model = make_tiny(family, max_position_embeddings=16).to(device)
    other = make_tiny(family, max_position_embeddings=16, seed=1).to(device)
    modeling = sys.modules[type(model).__module__]
    original = modeling.apply_rotary_pos_emb
    with torch.no_grad():
        other_before = other(ids).logits
    out = {}
    for kernel in ("torch", "triton"):
        calls["modeling"].clear()
        calls["attention"].clear()
        with rope_ext.patched(model, method, kernel=kernel, **params) as handle, torch.no_grad():
            assert handle.kernel == kernel
            out[kernel] = model(ids).logits
            seen = {where: list(kernels) for where, kernels in calls.items()}
            assert torch.equal(other(ids).logits, other_before), "an unpatched model changed"
            assert calls == seen, "an unpatched model used the kernel"
        assert modeling.apply_rotary_pos_emb is original
        static = handle.method.rotates == "static"
        layers = model.config.num_hidden_layers
        assert seen["modeling"] == (["triton"] * layers if static and kernel == "triton" else [])
        assert set(seen["attention"]) == (set() if static or kernel == "torch" else {"triton"})
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,params", [("rerope", {"window": 8}), ("dynamic_ntk", {"factor": 2.0}), ("self_extend", {"group_size": 2, "window": 8})])
def test_identity_tables_skip_the_models_own_rotation(monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]) -> None:
    """Methods that rotate in rope_ext's attention hand out cos = 1, sin = 0; the model's own
    rotation by them is skipped for this model only, and the function is restored at unpatch.
    The swap's user count starts at zero here, whatever models other tests left patched."""
    model, other = make_tiny("llama"), make_tiny("llama", seed=1)
    modeling = sys.modules[type(model).__module__]
    calls = []
    original = modeling.apply_rotary_pos_emb

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", counting)
    monkeypatch.setattr(fused_rotary, "_USERS", {})
    ids = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        rope_ext.patch(model, method, **params)
        assert fused_rotary.users(modeling) == 1
        model(ids)
        assert calls == []
        other(ids)
        assert len(calls) == other.config.num_hidden_layers
        rope_ext.unpatch(model)
    assert fused_rotary.users(modeling) == 0
    assert modeling.apply_rotary_pos_emb is counting
