"""CoPE (Golovneva et al. 2024): contextual positions against a direct re-derivation, all gates 1 as
ordinary relative position (p_ij = i - j + 1, the paper's sum over t = j..i), the interpolation and
clamp of the embeddings, a lab run that trains, reloads bitwise and evaluates at 4x, and bad npos."""
from __future__ import annotations

import pytest
import torch
from test_lab_encodings import check_lab_run, tiny

from rope_ext.eval import encodings
from rope_ext.eval.encodings.cope import cope_gates, cope_position_logits, cope_positions


def causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]


def test_positions_sum_the_gates_from_key_to_query():
    gates = torch.rand(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    got = cope_positions(gates, causal(6))
    for h in range(2):
        for i in range(6):
            for j in range(6):
                want = sum(float(gates[0, h, i, t]) for t in range(j, i + 1))
                assert abs(float(got[0, h, i, j]) - want) < 1e-6


def test_gates_are_the_sigmoid_of_scaled_attention_logits():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    assert torch.allclose(cope_gates(q, k, 0.5), torch.sigmoid(q @ k.transpose(-1, -2) * 0.5))


def test_all_gates_one_is_ordinary_relative_position():
    n, d, npos = 7, 4, 10
    positions = cope_positions(torch.ones(1, 1, n, n), causal(n))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(positions[0, 0][j <= i], (i - j + 1).expand(n, n)[j <= i].float())
    query, embeddings = torch.randn(1, 1, n, d), torch.randn(d, npos)
    logits = cope_position_logits(query, embeddings, positions)
    for a in range(n):
        for b in range(a + 1):
            assert torch.allclose(logits[0, 0, a, b], query[0, 0, a] @ embeddings[:, a - b + 1], atol=1e-6)


def test_fractional_positions_interpolate_and_large_ones_clamp():
    d, npos = 3, 5
    query, embeddings = torch.randn(1, 1, 1, d), torch.randn(d, npos)
    positions = torch.tensor([[[[0.0, 1.25, 3.5, 4.0, 9.7]]]])
    got = cope_position_logits(query, embeddings, positions)[0, 0, 0]
    e = embeddings.T
    want = [e[0], 0.75 * e[1] + 0.25 * e[2], 0.5 * e[3] + 0.5 * e[4], e[4], e[4]]
    assert torch.allclose(got, torch.stack([query[0, 0, 0] @ v for v in want]), atol=1e-6)


def test_embeddings_per_layer_start_at_zero_and_default_to_the_trained_length():
    model = tiny("cope")
    embeddings = model.model.layers[0].self_attn.lab_pe.embeddings
    assert embeddings.shape == (16, 17) and not embeddings.any() and embeddings.requires_grad
    assert tiny("cope", (("npos", 40),)).model.layers[1].self_attn.lab_pe.embeddings.shape == (16, 40)
    assert torch.equal(model.model.rotary_emb.inv_freq, torch.zeros(8))


def test_lab_run_trains_reloads_and_evaluates_longer(tmp_path, text_corpus):
    loaded = check_lab_run(tmp_path, text_corpus, "cope")
    assert loaded.model.layers[0].self_attn.lab_pe.embeddings.any()  # trained away from zero, saved, reloaded


def test_bad_parameters():
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="cope: npos must be an integer >= 2"):
            encodings.build("cope", {"npos": bad})
    with pytest.raises(TypeError, match="cope: npos must be int"):
        encodings.build("cope", {"npos": 16.0})
