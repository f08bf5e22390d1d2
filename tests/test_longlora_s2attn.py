"""S2-Attn against an explicit-mask reference, the paper's Algorithm 1, and full attention; then
through rope_ext.patch's training seam on every family."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTENTION_FAMILIES, make_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import rope_ext
from rope_ext.longlora.s2attn import S2Attn, group_runs, shifted_sparse_attention


def sdpa_causal(q, k, v):
    """What the seam passes for SDPA: plain causal attention, KV heads repeated, (B, L, H, d) out."""
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    return out.transpose(1, 2)


def eager_causal(q, k, v):
    """The eager flavour: explicit scores and an additive causal mask."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L = q.shape[2]
    mask = torch.full((L, L), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask, dim=-1)
    return (weights @ v).transpose(1, 2)


def reference(q, k, v, G, shift=True, wrap=True):
    """Every head's allowed (query, key) pairs written out as a mask, then one softmax."""
    B, H, L, d = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pos = torch.arange(L)
    causal = pos[None, :] <= pos[:, None]
    if G >= L:
        masks = [causal] * H
    else:
        half = G // 2
        plain = (pos[:, None] // G == pos[None, :] // G) & causal
        if wrap:
            r = (pos - half) % L
            shifted = (r[:, None] // G == r[None, :] // G) & (r[None, :] <= r[:, None])
        else:
            gid = (pos + G - half) // G
            shifted = (gid[:, None] == gid[None, :]) & causal
        use_shift = shift and half > 0
        masks = [plain if (h < H // 2 or not use_shift) else shifted for h in range(H)]
    allowed = torch.stack(masks)[None]
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).matmul(v).transpose(1, 2)


def algorithm_1(q, k, v, G):
    """LongLoRA's Algorithm 1 (the paper's PyTorch-style pseudocode), KV heads repeated, H even."""
    B, H, N, D = q.shape
    rep = H // k.shape[1]
    qkv = torch.stack([q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)], 2).permute(0, 3, 2, 1, 4)  # B N 3 H D
    qkv = torch.cat((qkv.chunk(2, 3)[0], qkv.chunk(2, 3)[1].roll(-G // 2, 1)), 3).view(B * N // G, G, 3, H, D)
    gq, gk, gv = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = F.scaled_dot_product_attention(gq, gk, gv, is_causal=True).transpose(1, 2).reshape(B, N, H, D)
    return torch.cat((out.chunk(2, 2)[0], out.chunk(2, 2)[1].roll(G // 2, 1)), 2)


def qkv(B=2, H=4, Hkv=2, L=32, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(B, h, L, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv)]
    return [t.requires_grad_(grad) for t in tensors]


@pytest.mark.parametrize("causal", [sdpa_causal, eager_causal])
@pytest.mark.parametrize("shift,wrap", [(True, True), (True, False), (False, False)])
def test_one_group_covering_the_sequence_is_full_attention(causal, shift, wrap):
    q, k, v = qkv(L=24)
    out = shifted_sparse_attention(q, k, v, causal, group_size=24, shift=shift, wrap=wrap)
    assert torch.allclose(out, causal(q, k, v), atol=1e-12)
    assert torch.allclose(S2Attn(group_size_ratio=1.0, shift=shift, wrap=wrap).attend(q, k, v, causal), causal(q, k, v), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 40), G=st.integers(1, 44), heads=st.sampled_from([(2, 2), (4, 2), (4, 1), (6, 3), (8, 4), (6, 2), (3, 1)]),
       shift=st.booleans(), wrap=st.booleans(), B=st.integers(1, 2))
def test_matches_the_explicit_mask_reference(L, G, heads, shift, wrap, B):
    H, Hkv = heads
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, L=L)
    out = shifted_sparse_attention(q, k, v, sdpa_causal, G, shift=shift, wrap=wrap)
    assert out.shape == (B, L, H, q.shape[-1])
    assert torch.allclose(out, reference(q, k, v, G, shift, wrap), atol=1e-10)


@pytest.mark.parametrize("L,G,H,Hkv", [(32, 8, 4, 2), (48, 12, 8, 8), (64, 16, 4, 4)])
def test_wrap_reproduces_the_papers_algorithm_1(L, G, H, Hkv):
    q, k, v = qkv(H=H, Hkv=Hkv, L=L)
    assert torch.allclose(shifted_sparse_attention(q, k, v, sdpa_causal, G, wrap=True), algorithm_1(q, k, v, G), atol=1e-10)


def test_without_wrap_no_token_sees_the_future_and_gradients_match():
    q, k, v = qkv(L=32, grad=True)
    out = shifted_sparse_attention(q, k, v, sdpa_causal, 8, wrap=False)
    # a change to the last token must not move any earlier output (it does with wrap=True)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] += 1.0
    moved = shifted_sparse_attention(q.detach(), k2, v2, sdpa_causal, 8, wrap=False)
    assert torch.equal(moved[:, :-1], out.detach()[:, :-1])
    wrapped = shifted_sparse_attention(q.detach(), k2, v2, sdpa_causal, 8, wrap=True)
    assert not torch.allclose(wrapped[:, :4], shifted_sparse_attention(q.detach(), k.detach(), v.detach(), sdpa_causal, 8, wrap=True)[:, :4])
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((reference(q, k, v, 8, wrap=False) * weights).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, expected))


def test_group_runs_partition_the_sequence():
    for L in range(1, 30):
        for G in range(1, L + 1):
            for offset in (0, G // 2):
                covered = [i for start, count, size in group_runs(L, G, offset) for i in range(start, start + count * size)]
                assert covered == list(range(L))


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size_ratio": 0.0}, r"group_size_ratio must be a number in \(0, 1\], got 0\.0"),
    ({"group_size_ratio": 1.5}, r"group_size_ratio must be a number in \(0, 1\], got 1\.5"),
    ({"group_size": 0}, "group_size must be an integer >= 1 or None, got 0"),
    ({"group_size": 2.5}, r"group_size must be an integer >= 1 or None, got 2\.5"),
    ({"wrap": "no"}, "wrap must be True or False, got 'no'"),
])
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S2Attn(**kwargs)
    with pytest.raises(ValueError, match="^group_size must be an integer >= 1, got 0"):
        shifted_sparse_attention(*qkv(), sdpa_causal, 0)


class ReferencePattern:
    """The explicit-mask reference as a training pattern (Llama scaling d^-0.5, no dropout)."""

    def __init__(self, ratio, wrap):
        self.ratio, self.wrap = ratio, wrap

    def attend(self, query, key, value, causal):
        return reference(query, key, value, round(query.shape[2] * self.ratio), wrap=self.wrap).to(query.dtype)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("wrap", [False, True])
def test_through_the_patch_training_uses_s2attn_and_inference_full_attention(attn, wrap):
    ids = torch.randint(3, 97, (2, 64))
    models = {}
    for name, pattern in (("s2", S2Attn(wrap=wrap)), ("ref", ReferencePattern(0.25, wrap)), ("full", None)):
        models[name] = make_tiny("llama", attn=attn)
        rope_ext.patch(models[name], "pi", factor=2.0, train_attention=pattern)
    with torch.no_grad():
        assert torch.allclose(models["s2"](ids).logits, models["full"](ids).logits, atol=1e-5)
        for m in models.values():
            m.train()
        s2, ref, full = (models[n](ids).logits for n in ("s2", "ref", "full"))
    effect = (s2 - full).abs().max().item()
    assert torch.allclose(s2, ref, atol=1e-5) and effect >= 100 * 1e-5, f"S2-Attn changed the training logits by {effect:.2e}"


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_every_family_one_group_equals_full_attention_and_trains(family):
    attn = "eager" if family == "gemma2" else "sdpa"
    ids = torch.randint(3, 97, (1, 64))
    # the seam takes a sliding-window mask for padding and refuses it: keep the window >= the length
    window = {"sliding_window": 64} if family in ("gemma2", "gemma3_text") else {}
    full, one_group, grouped = (make_tiny(family, attn=attn, **window).train() for _ in range(3))
    rope_ext.patch(full, "yarn", factor=2.0)
    rope_ext.patch(one_group, "yarn", factor=2.0, train_attention=S2Attn(group_size_ratio=1.0))
    rope_ext.patch(grouped, "yarn", factor=2.0, train_attention=S2Attn())
    with torch.no_grad():
        assert torch.allclose(one_group(ids, labels=ids).loss, full(ids, labels=ids).loss, atol=1e-5)
    loss = grouped(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in grouped.parameters() if p.requires_grad and p.dim() == 2)
