"""KERPLE (Chi et al. 2022): the log and power kernels against a direct re-derivation, power with
r2 = 1 as ALiBi's linear bias (the whole model against the ALiBi lab model), the parameters kept in
their domain, a lab run that trains, reloads bitwise and evaluates at 4x, and bad parameters."""
from __future__ import annotations

import math

import pytest
import torch
from test_lab_encodings import check_lab_run, tiny

from rope_ext.eval import encodings
from rope_ext.eval.encodings.kerple import kerple_log_bias, kerple_power_bias
from rope_ext.methods.alibi import alibi_bias, alibi_slopes


def reference(kernel, r1: list[float], r2: list[float], q_pos: list[int], k_pos: list[int]) -> torch.Tensor:
    return torch.tensor([[[kernel(a, b, abs(i - j)) for j in k_pos] for i in q_pos] for a, b in zip(r1, r2)])[None]


def test_kernels_match_the_paper():
    r1, r2 = [0.3, 1.7, 0.01], [0.9, 0.05, 2.0]
    q_pos, k_pos = [5, 6, 40], [0, 3, 5, 6, 39, 40]
    distance = (torch.tensor(q_pos)[:, None] - torch.tensor(k_pos)[None, :]).abs().float()[None]
    log = kerple_log_bias(torch.tensor(r1), torch.tensor(r2), distance)
    power = kerple_power_bias(torch.tensor(r1), torch.tensor(r2), distance)
    assert torch.allclose(log, reference(lambda a, b, d: -a * math.log(1 + b * d), r1, r2, q_pos, k_pos), atol=1e-6)
    assert torch.allclose(power, reference(lambda a, b, d: -a * d ** b, r1, r2, q_pos, k_pos), atol=1e-5)


def test_power_with_exponent_one_is_alibi():
    slopes = alibi_slopes(2, 8.0)
    positions = torch.arange(12)[None]
    distance = (positions[:, :, None] - positions[:, None, :]).abs().float()
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    power = kerple_power_bias(slopes, torch.ones(2), distance)
    assert torch.equal(power[..., causal], alibi_bias(slopes, positions, positions)[..., causal])

    kerple, alibi = tiny("kerple_power", (("eps", 1e-3),)), tiny("alibi")  # one seed: the same weights but KERPLE's
    assert slopes.min() > 1e-3  # eps: slopes stay as set
    with torch.no_grad():
        for layer in kerple.model.layers:
            layer.self_attn.lab_pe.r1.copy_(slopes)
            layer.self_attn.lab_pe.r2.fill_(1.0)
        x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(kerple(x).logits, alibi(x).logits, atol=1e-5)


@pytest.mark.parametrize("position", ["kerple_log", "kerple_power"])
def test_parameters_are_learned_per_head_and_projected(position):
    model = tiny(position, (("eps", 0.05),))
    state = model.state_dict()
    assert {k for k in state if ".lab_pe." in k} == {f"model.layers.{i}.self_attn.lab_pe.{p}" for i in (0, 1) for p in ("r1", "r2")}
    r1 = model.model.layers[0].self_attn.lab_pe.r1
    r2 = model.model.layers[0].self_attn.lab_pe.r2
    assert r1.shape == r2.shape == (2,) and r1.requires_grad
    assert torch.equal(model.model.rotary_emb.inv_freq, torch.zeros(8))  # no rotation
    with torch.no_grad():
        r1.fill_(-1.0)
        r2.fill_(3.0)
        model(torch.randint(3, 259, (1, 8)))
    assert torch.equal(r1, torch.full((2,), 0.05))
    assert torch.equal(r2, torch.full((2,), 2.0 if position == "kerple_power" else 3.0))


def test_two_forward_passes_then_one_backward():
    model = tiny("kerple_log").train()
    x = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    (model(input_ids=x, labels=x).loss + model(input_ids=x.flip(1), labels=x.flip(1)).loss).backward()
    assert model.model.layers[0].self_attn.lab_pe.r2.grad.abs().sum() > 0


@pytest.mark.parametrize("position", ["kerple_log", "kerple_power"])
def test_lab_run_trains_reloads_and_evaluates_longer(tmp_path, text_corpus, position):
    check_lab_run(tmp_path, text_corpus, position)


def test_bad_parameters():
    for bad in (0.0, -1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="kerple_log: eps must be"):
            encodings.build("kerple_log", {"eps": bad})
    with pytest.raises(TypeError, match="kerple_power: eps must be int or float"):
        encodings.build("kerple_power", {"eps": "small"})
    with pytest.raises(ValueError, match="unknown parameter 'r2' for encoding 'kerple_power'; allowed: eps"):
        encodings.build("kerple_power", {"r2": 1.0})
