"""The patch's kernel choices: the merged two-part path inside a patched model equals the
query-blocked reference, and kernel="triton" (under Triton's interpreter here) equals "torch"."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rope_ext
from rope_ext import fused_rotary
from tests.conftest import make_tiny


def _runtimes(model):
    return {id(m.rope_ext_runtime): m.rope_ext_runtime for m in model.modules() if hasattr(m, "rope_ext_runtime")}.values()


def _padded_batch(vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,params", [("rerope", {"window": 8}), ("leaky_rerope", {"window": 8, "k": 4.0})])
def test_merged_two_part_equals_reference_in_a_patched_model(attn, method, params):
    model = make_tiny("llama", attn=attn)
    ids, mask = _padded_batch(model.config.vocab_size, 40)
    rope_ext.patch(model, method, **params)
    assert all(rt.two_part_impl == "merged" for rt in _runtimes(model))
    with torch.no_grad():
        merged = model(ids, attention_mask=mask).logits
        for rt in _runtimes(model):
            rt.two_part_impl = "reference"
        reference = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(merged[mask.bool()], reference[mask.bool()], atol=2e-5, rtol=1e-5)


def test_triton_kernel_off_cuda_is_refused_and_model_untouched(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="kernel='triton' needs CUDA tensors"):
        rope_ext.patch(model, "rerope", window=8, kernel="triton")
    assert rope_ext.current(model) is None


FRESH = textwrap.dedent("""
    import os, sys, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import rope_ext, rope_ext.rotary as rotary
    from tests.conftest import make_tiny
    fused_calls = []
    plain_apply = rotary.apply_rotary
    def counting(*args, **kwargs):
        fused_calls.append(kwargs.get("kernel"))
        return plain_apply(*args, **kwargs)
    rotary.apply_rotary = counting
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    cases = [("llama", "rerope", {"window": 8}), ("llama", "dynamic_ntk", {"factor": 4.0}),
             ("llama", "yarn", {"factor": 2.0}), ("gpt_neox", "pi", {"factor": 2.0}), ("phi3", "ntk", {"factor": 2.0})]
    for family, method, params in cases:
        model = make_tiny(family, attn="sdpa", max_position_embeddings=16)
        modeling = sys.modules[type(model).__module__]
        original = modeling.apply_rotary_pos_emb
        other = make_tiny(family, attn="sdpa", max_position_embeddings=16, seed=1)
        with torch.no_grad():
            other_before = other(ids).logits
        out = {}
        for kernel in ("torch", "triton"):
            fused_calls.clear()
            with rope_ext.patched(model, method, kernel=kernel, **params) as handle, torch.no_grad():
                assert handle.kernel == kernel
                out[kernel] = model(ids).logits
                assert torch.equal(other(ids).logits, other_before), "an unpatched model changed"
            static = handle.method.rotation == "static"
            assert fused_calls == (["triton"] * model.config.num_hidden_layers if static and kernel == "triton" else []), fused_calls
            assert modeling.apply_rotary_pos_emb is original
        torch.testing.assert_close(out["triton"], out["torch"], atol=1e-5, rtol=1e-5)
        print(family, method, "max diff", (out["triton"] - out["torch"]).abs().max().item())
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernel tests compile the real kernel")
def test_triton_kernel_in_a_patched_model_equals_torch_under_the_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", FRESH], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for case in ("llama rerope", "llama dynamic_ntk", "llama yarn", "gpt_neox pi", "phi3 ntk"):
        assert f"{case} max diff" in run.stdout


@pytest.mark.parametrize("method,params", [("rerope", {"window": 8}), ("dynamic_ntk", {"factor": 2.0}), ("self_extend", {"group_size": 2, "window": 8})])
def test_identity_tables_skip_the_models_own_rotation(monkeypatch, method, params):
    """Methods that rotate in rope_ext's attention hand out cos = 1, sin = 0; the model's own
    rotation by them is skipped for this model only, and the function is restored at unpatch."""
    model, other = make_tiny("llama"), make_tiny("llama", seed=1)
    modeling = sys.modules[type(model).__module__]
    calls = []
    original = modeling.apply_rotary_pos_emb

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", counting)
    ids = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        rope_ext.patch(model, method, **params)
        model(ids)
        assert calls == []
        other(ids)
        assert len(calls) == other.config.num_hidden_layers
        rope_ext.unpatch(model)
    restored = modeling.apply_rotary_pos_emb
    if fused_rotary.users(modeling) == 0:  # other tests' models may still be patched: then the swap stays
        assert restored is counting
    else:
        assert getattr(restored, fused_rotary.MARK) is counting
