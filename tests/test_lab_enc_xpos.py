"""Lab encoding xPos (Sun et al. 2022): the decay formula, the attention against a direct
re-derivation (score of pair i weighted by zeta_i^((n - m) / B)), zeta = 1 is RoPE, finite factors
at 32x, a 5-step lab run that saves and reloads bitwise, evaluation at 4x with and without a
rope_ext method. ``reference_attention`` and ``train_save_load`` serve the other lab-encoding tests."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rope_ext.eval import encodings
from rope_ext.eval.corpus import load_corpus
from rope_ext.eval.encodings.xpos import max_position, xpos_scale, xpos_zeta
from rope_ext.eval.lab import LabConfig, build_model, load_lab, lm_loss, random_windows, save_lab, train_loop
from rope_ext.eval.ppl import perplexity
from rope_ext.eval.tokens import byte_tokenizer, encode

T = 16
SMALL = dict(context=T, layers=2, hidden=32, heads=2, intermediate=32)
VOCAB = 259


def lab_model(position: str, **params: Any) -> torch.nn.Module:
    return build_model(LabConfig(**SMALL, position=position, pe_params=tuple(params.items())), VOCAB).eval()


def capture(model: torch.nn.Module, layer: int, ids: torch.Tensor, position_ids: torch.Tensor | None = None):
    """(input hidden states, output) of layer ``layer``'s attention module in one forward pass."""
    seen = {}
    attn = model.model.layers[layer].self_attn
    hooks = [attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True),
             attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))]
    with torch.no_grad():
        model(input_ids=ids, position_ids=position_ids)
    for hook in hooks:
        hook.remove()
    return seen["x"], seen["out"]


def reference_attention(attn: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor,
                        weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        allowed: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
                        theta: float = 10000.0) -> torch.Tensor:
    """Causal attention in float64 written from scratch: pair i of q and k as a complex number,
    score(n, m) = Re(sum_i q_i conj(k_i) weight(n - m, theta_i)_i) / sqrt(d) (weight = e^{j r theta_i}
    is RoPE); ``allowed`` (L, L) masks more keys, ``q_scale`` (L,) scales the queries; o_proj applied."""
    B, L, _ = x.shape
    d = attn.head_dim
    x = x.double()

    def heads(proj: torch.nn.Linear) -> torch.Tensor:
        return (x @ proj.weight.double().T).view(B, L, -1, d).transpose(1, 2)

    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    if q_scale is not None:
        q = q * q_scale.double()[None, None, :, None]
    qc, kc = (t[..., : d // 2] + 1j * t[..., d // 2:] for t in (q, k))
    thetas = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rel = (pos[:, None] - pos[None, :]).double()
    scores = torch.einsum("bhni,bhmi,nmi->bhnm", qc, kc.conj(), weight(rel, thetas)).real / math.sqrt(d)
    keep = rel >= 0 if allowed is None else (rel >= 0) & allowed
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, L, -1)
    return (out @ attn.o_proj.weight.double().T).float()


def rope_weight(rel: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    return torch.exp(1j * rel[..., None] * thetas)


def train_save_load(tmp_path: Path, corpus: str, position: str, **params: Any):
    """5 lab training steps (loss per step), save_lab, load_lab: (trained model, loaded model, losses)."""
    cfg = LabConfig(**SMALL, steps=5, batch=4, warmup=1, lr=1e-2, position=position, pe_params=tuple(params.items()),
                    corpus=corpus)
    tokenizer = byte_tokenizer()
    ids = encode(tokenizer, load_corpus(corpus, split="train").text())
    model = build_model(cfg, len(tokenizer))
    losses = train_loop(model, random_windows(ids, T, cfg.batch, torch.Generator().manual_seed(0)), lm_loss, cfg.steps,
                        cfg.lr, cfg.warmup, cfg.weight_decay, desc=f"test {position}")
    out = save_lab(model, tokenizer, tmp_path / position, {"kind": "lm", "config": dataclasses.asdict(cfg), "trained_length": T})
    loaded, _ = load_lab(out)
    return model.eval(), loaded, losses


def four_x_ppl(model: torch.nn.Module, methods: list[str]) -> list[float]:
    docs = [torch.randint(3, VOCAB, (4 * T,), generator=torch.Generator().manual_seed(1))]
    return [r["result"]["ppl"] for r in perplexity(model, docs, ["4x"], methods, sliding=False, progress=False)]


def decoding_matches_full(model: torch.nn.Module, length: int) -> bool:
    """Logits of a prefill + token-by-token decoding with the KV cache equal one full forward pass."""
    ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, : length // 2], use_cache=True)
        steps = [out.logits]
        for i in range(length // 2, length):
            out = model(input_ids=ids[:, i:i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    return torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_zeta_and_scales_follow_the_paper():
    d, gamma = 8, 0.4
    torchscale = (torch.arange(0, d, 2) + gamma * d) / ((1 + gamma) * d)  # torchscale XPOS.scale
    assert torch.allclose(xpos_zeta(d, gamma), torchscale.float())
    zeta, B = xpos_zeta(d, gamma), 16.0
    n, m = torch.tensor([[40]]), torch.tensor([[7]])
    product = xpos_scale(n, zeta, B) * xpos_scale(-m, zeta, B)
    assert torch.allclose(product[0, 0], zeta ** ((40 - 7) / B))
    assert bool((product < 1).all())  # the score decays with n - m


def test_attention_is_rope_with_the_pairwise_decay():
    B_ = 8.0
    model = lab_model("xpos", scale_base=B_)
    ids = torch.randint(3, VOCAB, (2, 24))
    pos = torch.arange(100, 124)  # absolute positions far from 0: only n - m may matter
    attn = model.model.layers[1].self_attn
    x, out = capture(model, 1, ids, pos[None, :])
    zeta = (torch.arange(0, attn.head_dim, 2, dtype=torch.float64) / attn.head_dim + 0.4) / 1.4

    def weight(rel, thetas):
        return rope_weight(rel, thetas) * zeta ** (rel[..., None] / B_)

    assert torch.allclose(out, reference_attention(attn, x, pos, weight), atol=1e-5)


def test_no_decay_is_rope():
    xpos, rope = lab_model("xpos", scale_base=4.0), lab_model("rope")
    for attn in (layer.self_attn for layer in xpos.model.layers):
        attn.lab_pe.zeta.fill_(1.0)
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    with torch.no_grad():
        assert torch.equal(xpos(input_ids=ids).logits, rope(input_ids=ids).logits)


def test_cached_decoding_equals_a_full_pass():
    assert decoding_matches_full(lab_model("xpos", scale_base=8.0), 3 * T)


def test_factors_stay_finite_at_32x_and_refuse_past_their_range():
    model = lab_model("xpos", scale_base=16.0)
    zeta = model.model.layers[0].self_attn.lab_pe.zeta
    assert max_position(zeta, 16.0, torch.float32) >= 32 * T
    with torch.no_grad():
        assert bool(torch.isfinite(model(input_ids=torch.randint(3, VOCAB, (1, 32 * T))).logits).all())
        far = torch.arange(10**5, 10**5 + 4)[None, :]
        with pytest.raises(ValueError, match="xpos: position 100003 is past .*use a larger scale_base"):
            model(input_ids=torch.randint(3, VOCAB, (1, 4)), position_ids=far)


def test_lab_run_lowers_the_loss_reloads_bitwise_and_evaluates_at_4x(tmp_path, text_corpus):
    trained, loaded, losses = train_save_load(tmp_path, text_corpus, "xpos", scale_base=16.0)
    assert losses[-1] < losses[0]
    ids = torch.randint(3, VOCAB, (2, 2 * T))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert all(math.isfinite(p) for p in four_x_ppl(loaded, ["none", "yarn", "rerope"]))


@pytest.mark.parametrize("params,exc,match", [
    ({"gamma": 0.0}, ValueError, "xpos: gamma must be > 0, got 0"),
    ({"gamma": float("nan")}, ValueError, "xpos: gamma must be finite"),
    ({"scale_base": -1.0}, ValueError, "xpos: scale_base must be > 0, got -1"),
    ({"scale_base": "512"}, TypeError, "xpos: scale_base must be int or float, got str"),
    ({"decay": 1.0}, ValueError, "unknown parameter 'decay' for encoding 'xpos'; allowed: gamma, scale_base"),
])
def test_bad_parameters_are_refused(params, exc, match):
    with pytest.raises(exc, match=match):
        encodings.build("xpos", params)
