"""Lab encoding inverse Leaky ReRoPE (Su 2023): the stretched distance map, the training attention
(values and gradients) against a direct re-derivation, k = 1 is RoPE, eval mode is plain RoPE, a
5-step lab run whose checkpoint reloads as plain RoPE, evaluation at 4x, bad parameters refused."""
from __future__ import annotations

import math

import pytest
import torch
from test_lab_enc_xpos import SMALL, T, VOCAB, capture, four_x_ppl, lab_model, reference_attention, train_save_load

from rope_ext.eval import encodings
from rope_ext.eval.encodings.inverse_leaky import stretched_far_positions
from rope_ext.eval.lab import LabConfig, build_model


def stretched(rel: torch.Tensor, w: int, k: float) -> torch.Tensor:
    """Su's Leaky ReRoPE distance: r below the window, w + (r - w) / k past it."""
    return torch.where(rel < w, rel, w + (rel - w) / k)


def stretched_weight(w: int, k: float):
    return lambda rel, thetas: torch.exp(1j * stretched(rel, w, k)[..., None] * thetas)


@pytest.mark.parametrize("w,k", [(1, 0.5), (4, 0.25), (7, 0.1), (4, 1.0)])
def test_far_positions_give_the_stretched_distance(w, k):
    n, m = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    far = (n - m) >= w
    fq, fk = stretched_far_positions(n.reshape(1, -1), m.reshape(1, -1), w, k)
    rel = (fq - fk).reshape(64, 64)
    assert torch.allclose(rel[far], stretched((n - m).double(), w, k)[far].float(), atol=1e-4)
    assert bool((rel[far] >= (n - m)[far] - 1e-4).all())  # k <= 1 stretches


def test_training_attention_is_rope_with_stretched_far_distances():
    w, k = 4, 0.25
    model = lab_model("inverse_leaky", window=w, k=k).train()
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    x, out = capture(model, 1, ids)
    reference = reference_attention(model.model.layers[1].self_attn, x, torch.arange(3 * T), stretched_weight(w, k))
    assert torch.allclose(out, reference, atol=1e-5)


def test_gradients_match_the_reference():
    w, k = 4, 0.25
    model = lab_model("inverse_leaky", window=w, k=k).train()
    attn = model.model.layers[0].self_attn
    x, _ = capture(model, 0, torch.randint(3, VOCAB, (1, 2 * T)))
    pos = torch.arange(2 * T)
    cos = torch.ones(1, 2 * T, attn.head_dim)
    out = attn(hidden_states=x, position_embeddings=(cos, cos), attention_mask=None, position_ids=pos[None, :])[0]
    grad, = torch.autograd.grad(out.square().sum(), attn.q_proj.weight)
    reference = reference_attention(attn, x, pos, stretched_weight(w, k))
    expected, = torch.autograd.grad(reference.square().sum(), attn.q_proj.weight)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_k_one_trains_as_rope():
    leaky, rope = lab_model("inverse_leaky", window=4, k=1.0).train(), lab_model("rope").train()
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    with torch.no_grad():
        assert torch.allclose(leaky(input_ids=ids).logits, rope(input_ids=ids).logits, atol=1e-5)


def test_eval_mode_is_plain_rope():
    leaky, rope = lab_model("inverse_leaky", window=4, k=0.25), lab_model("rope")
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    with torch.no_grad():
        assert torch.equal(leaky(input_ids=ids).logits, rope(input_ids=ids).logits)
        assert not torch.allclose(leaky.train()(input_ids=ids).logits, rope(input_ids=ids).logits)


def test_lab_run_trains_stretched_and_reloads_as_plain_rope(tmp_path, text_corpus):
    trained, loaded, losses = train_save_load(tmp_path, text_corpus, "inverse_leaky", window=4, k=0.25)
    assert losses[-1] < losses[0]
    assert encodings.build("inverse_leaky", {"window": 4, "k": 0.25}).inference() == ("none", {})
    plain = build_model(LabConfig(**SMALL), VOCAB).eval()
    plain.load_state_dict(trained.state_dict())
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert all(math.isfinite(p) for p in four_x_ppl(loaded, ["none", "yarn", "rerope"]))


@pytest.mark.parametrize("params,exc,match", [
    ({"k": 0.0}, ValueError, "inverse_leaky: k must be > 0, got 0"),
    ({"k": 4.0}, ValueError, "inverse_leaky: k must be <= 1, got 4"),
    ({"k": float("inf")}, ValueError, "inverse_leaky: k must be finite"),
    ({"window": 0}, ValueError, "inverse_leaky: window must be an integer >= 1, got 0"),
    ({"window": "8"}, TypeError, "inverse_leaky: window must be int"),
    ({"slope": 2.0}, ValueError, "unknown parameter 'slope' for encoding 'inverse_leaky'; allowed: window, k"),
])
def test_bad_parameters_are_refused(params, exc, match):
    with pytest.raises(exc, match=match):
        encodings.build("inverse_leaky", params)


def test_window_must_leave_distances_to_stretch():
    with pytest.raises(ValueError, match=f"inverse_leaky: window={T} must be in \\[1, {T - 1}\\]"):
        lab_model("inverse_leaky", window=T)
