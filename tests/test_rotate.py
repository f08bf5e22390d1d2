"""``rope_ext.rotary.rotate`` is bitwise transformers' rotation, forward and backward, on both of the
torch op's paths (few calls / general), and it is the torch op with rounding="each"."""
from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import (
    apply_rotary_pos_emb as neox_partial,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rope_ext.kernels import rotary_ops_torch
from rope_ext.methods.base import rope_inv_freq
from rope_ext.rotary import apply_rotary, cos_sin, rotate


def _inputs(dtype: torch.dtype, rotary_dim: int, grad: bool = False):
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 40, 64).to(dtype), torch.randn(2, 2, 40, 64).to(dtype)
    cos, sin = cos_sin(rope_inv_freq(1e4, rotary_dim), torch.arange(40)[None].expand(2, -1) + torch.tensor([[0], [7]]), 1.25, dtype)
    return q.requires_grad_(grad), k.requires_grad_(grad), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("few_calls", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotate_is_bitwise_transformers(monkeypatch, dtype, few_calls, rotary_dim):
    monkeypatch.setattr(rotary_ops_torch, "SMALL", 1 << 30 if few_calls else 0)
    q, k, cos, sin = _inputs(dtype, rotary_dim)
    hf = apply_rotary_pos_emb if rotary_dim == 64 else neox_partial
    hq, hk = hf(q, k, cos, sin)
    assert torch.equal(rotate(q, cos, sin), hq) and torch.equal(rotate(k, cos, sin), hk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("few_calls", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotate_gradient_is_bitwise_transformers(monkeypatch, dtype, few_calls, rotary_dim):
    """The backward (the op rotating the gradient by -theta, rounded the same way) equals autograd
    through transformers' expression."""
    monkeypatch.setattr(rotary_ops_torch, "SMALL", 1 << 30 if few_calls else 0)
    q, k, cos, sin = _inputs(dtype, rotary_dim, grad=True)
    g = torch.randn_like(q), torch.randn_like(k)
    hf = apply_rotary_pos_emb if rotary_dim == 64 else neox_partial
    expected = torch.autograd.grad(hf(q, k, cos, sin), (q, k), g)
    got = torch.autograd.grad((rotate(q, cos, sin), rotate(k, cos, sin)), (q, k), g)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_the_two_roundings_differ_only_by_rounding():
    """rounding="each" (transformers') and "once" (float32, the Triton op's) are one formula: in
    bf16 they agree to a bf16 ulp, and against float32 arithmetic "once" is never the worse."""
    q, k, cos, sin = _inputs(torch.bfloat16, 64)
    each = apply_rotary(q, k, cos, sin, kernel="torch", rounding="each")
    once = apply_rotary(q, k, cos, sin, kernel="torch")
    exact = apply_rotary(q.float(), k.float(), cos.float(), sin.float(), kernel="torch")
    for e, o, x in zip(each, once, exact):
        torch.testing.assert_close(e, o, atol=0.02, rtol=0.02)
        assert not torch.equal(e, o)
        assert (o.float() - x).abs().max() <= (e.float() - x).abs().max()
    with pytest.raises(ValueError, match="rounding must be one of"):
        apply_rotary(q, k, cos, sin, kernel="torch", rounding="twice")
