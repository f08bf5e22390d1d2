"""FIRE (Li et al. 2023): the normalised distance against a direct re-derivation, the bias as the MLP
applied per distance, the progressive interpolation's range at any length, the learned state, a lab
run that trains, reloads bitwise and evaluates at 4x, and bad parameters."""
from __future__ import annotations

import math

import pytest
import torch
from test_lab_encodings import check_lab_run, tiny

from rope_ext.eval import encodings
from rope_ext.eval.encodings.fire import fire_bias, fire_normalized_distance


def test_normalized_distance_matches_the_paper():
    c, threshold, eps = 0.3, 6.0, 1e-6
    q_pos, k_pos = [0, 2, 5, 9, 30], [0, 1, 2, 5, 9, 30]
    got = fire_normalized_distance(torch.tensor([q_pos]), torch.tensor([k_pos]), torch.tensor(c), torch.tensor(threshold), eps)

    def psi(x: float) -> float:
        return math.log(abs(c * x) + 1)

    want = torch.tensor([[[psi(i - j) / (psi(max(threshold, i)) + eps) for j in k_pos] for i in q_pos]])
    assert torch.allclose(got, want, atol=1e-6)


def test_progressive_interpolation_keeps_distances_in_the_unit_interval():
    positions = torch.arange(4096)[None]
    normalized = fire_normalized_distance(positions[:, -64:], positions, torch.tensor(0.1), torch.tensor(512.0), 1e-6)
    causal = positions[0, None, :] <= positions[0, -64:, None]
    visible = normalized[0][causal]
    assert visible.min() == 0 and visible.max() <= 1 and visible.max() > 0.99


def test_bias_is_the_mlp_of_each_distance_per_head():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    normalized = torch.rand(2, 5, 7)
    bias = fire_bias(mlp, normalized)
    assert bias.shape == (2, 3, 5, 7)
    w1, b1, w2, b2 = mlp[0].weight[:, 0], mlp[0].bias, mlp[2].weight, mlp[2].bias
    for b, i, j in ((0, 0, 0), (1, 4, 6), (0, 2, 3)):
        hidden = torch.relu(w1 * normalized[b, i, j] + b1)
        assert torch.allclose(bias[b, :, i, j], w2 @ hidden + b2, atol=1e-6)


def test_learned_state_is_per_layer_and_saved():
    model = tiny("fire", (("width", 8), ("init_c", 0.5), ("init_threshold", 4.0)))
    fire = model.model.layers[1].self_attn.lab_pe
    assert fire.mlp[0].out_features == 8 and fire.mlp[2].out_features == 2
    assert float(fire.c.detach()) == 0.5 and float(fire.threshold().detach()) == 4.0 and fire.c.requires_grad and fire.threshold_scale.requires_grad
    keys = {k for k in model.state_dict() if "layers.1.self_attn.lab_pe." in k}
    assert {"model.layers.1.self_attn.lab_pe.c", "model.layers.1.self_attn.lab_pe.threshold_scale",
            "model.layers.1.self_attn.lab_pe.init_threshold", "model.layers.1.self_attn.lab_pe.mlp.0.weight"} <= keys
    assert torch.equal(model.model.rotary_emb.inv_freq, torch.zeros(8))


def test_lab_run_trains_reloads_and_evaluates_longer(tmp_path, text_corpus):
    check_lab_run(tmp_path, text_corpus, "fire", (("init_threshold", 8.0),))


def test_bad_parameters():
    for params, message in (({"width": 0}, "fire: width must be an integer >= 1"), ({"init_c": 0.0}, "fire: init_c must be > 0"),
                            ({"init_threshold": -1.0}, "fire: init_threshold must be > 0"), ({"eps": 2.0}, "fire: eps must be <= 1")):
        with pytest.raises(ValueError, match=message):
            encodings.build("fire", params)
    with pytest.raises(TypeError, match="fire: width must be int"):
        encodings.build("fire", {"width": 3.5})
