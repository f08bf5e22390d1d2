"""``rope_ext.rotary.rotate`` is bitwise transformers' rotation, on both of its paths."""
from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import (
    apply_rotary_pos_emb as neox_partial,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rope_ext import rotary
from rope_ext.methods.base import rope_inv_freq
from rope_ext.rotary import cos_sin, rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("few_calls", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotate_is_bitwise_transformers(monkeypatch, dtype, few_calls, rotary_dim):
    monkeypatch.setattr(rotary, "FEW_CALLS", 1 << 30 if few_calls else 0)
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 40, 64).to(dtype), torch.randn(2, 2, 40, 64).to(dtype)
    cos, sin = cos_sin(rope_inv_freq(1e4, rotary_dim), torch.arange(40)[None].expand(2, -1) + torch.tensor([[0], [7]]), 1.25, dtype)
    hf = apply_rotary_pos_emb if rotary_dim == 64 else neox_partial
    hq, hk = hf(q, k, cos, sin)
    assert torch.equal(rotate(q, cos, sin), hq) and torch.equal(rotate(k, cos, sin), hk)
