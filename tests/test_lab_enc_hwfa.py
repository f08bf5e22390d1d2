"""Lab encoding HWFA (Su 2023): windowed RoPE layers and a full, position-free, log-n top layer
against a direct re-derivation; window >= length with a positional top layer is plain RoPE; a
5-step lab run that reloads bitwise; evaluation at 4x; bad parameters refused."""
from __future__ import annotations

import math

import pytest
import torch
from test_lab_enc_xpos import T, VOCAB, capture, decoding_matches_full, four_x_ppl, lab_model, reference_attention, rope_weight, train_save_load

from rope_ext.eval import encodings
from rope_ext.eval.lab import LabConfig, build_model


def test_lower_layer_is_windowed_rope():
    w = 5
    model = lab_model("hwfa", window=w)
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    x, out = capture(model, 0, ids)
    pos = torch.arange(3 * T)
    window = (pos[:, None] - pos[None, :]) < w
    assert torch.allclose(out, reference_attention(model.model.layers[0].self_attn, x, pos, rope_weight, window), atol=1e-5)


def test_top_layer_is_full_attention_without_positions_and_log_n_queries():
    model = lab_model("hwfa", window=4)
    ids = torch.randint(3, VOCAB, (2, 4 * T))
    x, out = capture(model, 1, ids)
    pos = torch.arange(4 * T)
    log_n = torch.tensor([max(1.0, math.log(n + 1) / math.log(T)) for n in range(4 * T)])

    def no_position(rel, thetas):
        return torch.ones(*rel.shape, len(thetas), dtype=torch.complex128)

    reference = reference_attention(model.model.layers[1].self_attn, x, pos, no_position, q_scale=log_n)
    assert torch.allclose(out, reference, atol=1e-5)


def test_window_covering_the_length_with_a_positional_top_layer_is_rope():
    hwfa, rope = lab_model("hwfa", window=T, top_rope=True), lab_model("rope")
    ids = torch.randint(3, VOCAB, (2, T))
    with torch.no_grad():
        assert torch.equal(hwfa(input_ids=ids).logits, rope(input_ids=ids).logits)
        longer = torch.randint(3, VOCAB, (2, 2 * T))  # past the window: the windowed layers differ
        assert not torch.allclose(hwfa(input_ids=longer).logits, rope(input_ids=longer).logits)


def test_cached_decoding_equals_a_full_pass():
    assert decoding_matches_full(lab_model("hwfa", window=5), 3 * T)


def test_default_window_is_half_the_trained_length():
    model = lab_model("hwfa")
    assert model.model.layers[0].self_attn.lab_pe.window == T // 2
    assert model.model.layers[1].self_attn.lab_pe.window is None


def test_lab_run_lowers_the_loss_reloads_bitwise_and_evaluates_at_4x(tmp_path, text_corpus):
    trained, loaded, losses = train_save_load(tmp_path, text_corpus, "hwfa", window=8)
    assert losses[-1] < losses[0]
    ids = torch.randint(3, VOCAB, (2, 3 * T))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert math.isfinite(four_x_ppl(loaded, ["none"])[0])


@pytest.mark.parametrize("params,exc,match", [
    ({"window": 0}, ValueError, "hwfa: window must be an integer >= 1, got 0"),
    ({"window": 2.5}, TypeError, "hwfa: window must be int"),
    ({"top_rope": "yes"}, TypeError, "hwfa: top_rope must be bool"),
    ({"full_layers": 2}, ValueError, "unknown parameter 'full_layers' for encoding 'hwfa'; allowed: window, top_rope"),
])
def test_bad_parameters_are_refused(params, exc, match):
    with pytest.raises(exc, match=match):
        encodings.build("hwfa", params)


def test_one_layer_is_refused():
    with pytest.raises(ValueError, match="hwfa needs at least 2 layers .*got 1"):
        build_model(LabConfig(context=T, layers=1, hidden=32, heads=2, intermediate=32, position="hwfa"), VOCAB)
