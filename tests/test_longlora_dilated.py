"""LongNet's dilated attention as a LongLoRA training pattern: against the dense LongNet oracle of
reference_model (per pair and head a boolean mask, an explicit log-sum-exp combination), through
rope_ext.patch's training seam (dilated in training mode, full attention in eval mode), gradients,
the recipe keys / flags and their errors, and a fine-tune from the command line."""
from __future__ import annotations

import re
from functools import partial

import pytest
import torch
from conftest import make_tiny
from reference_model import dilated_combination, reference_logits
from test_longlora_helpers import TRAINED, corpus, tiny_checkpoint

import rope_ext
from rope_ext import cli
from rope_ext.longlora.config import build_config, config_from_args
from rope_ext.longlora.dilated_pattern import DilatedPattern
from rope_ext.longlora.model import prepare, training_pattern

PAIRS = [((8, 16, 32), (1, 2, 4)), ((12, 24), (1, 3)), ((64,), (1,)), ((4, 8), (1, 2))]


def qkv(B=2, H=4, Hkv=2, L=40, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, d, generator=g, dtype=torch.float64).requires_grad_(grad) for h in (H, Hkv, Hkv)]


def causal(q, k, v, scale=None):
    """What the seam passes with SDPA: plain causal attention at the model's scale, (B, L, H, d) out."""
    rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                           is_causal=True, scale=scale)
    return out.transpose(1, 2)


def oracle(q, k, v, segments, dilations, scaling):
    """LongNet over dense scores: reference_model's mask-per-(pair, head) log-sum-exp combination, causal."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
    return dilated_combination(q @ k.transpose(-1, -2) * scaling, v, i, j, j <= i, segments, dilations).transpose(1, 2)


@pytest.mark.parametrize("segments,dilations", PAIRS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_pattern_equals_the_dense_longnet_oracle(segments, dilations, heads, kv_heads):
    q, k, v = qkv(H=heads, Hkv=kv_heads, L=40)
    out = DilatedPattern(segments=segments, dilations=dilations, scaling=0.3).attend(q, k, v, partial(causal, scale=0.3))
    assert out.shape == (2, 40, heads, 8)
    assert torch.allclose(out, oracle(q, k, v, segments, dilations, 0.3), atol=1e-6)


def test_one_dense_segment_covering_the_sequence_is_causal_attention():
    q, k, v = qkv(L=24)
    i, j = torch.arange(24)[:, None], torch.arange(24)[None, :]
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5
    dense = torch.softmax(scores.masked_fill(j > i, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    for segments in ((32,), (24,), (8, 16, 24)):  # one dense segment: the model's causal attention; (8, 16, 24): not
        dilations = (1,) * len(segments) if len(segments) == 1 else (1, 2, 4)
        out = DilatedPattern(segments=segments, dilations=dilations).attend(q, k, v, causal)
        assert torch.allclose(out, dense.transpose(1, 2), atol=1e-6) == (len(segments) == 1)


def test_gradients_equal_the_oracle_gradients():
    q, k, v = qkv(L=36, grad=True)
    weight = torch.randn(2, 36, 4, 8, dtype=torch.float64)
    (DilatedPattern(segments=(8, 16, 32), dilations=(1, 2, 4)).attend(q, k, v, causal) * weight).sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (oracle(q, k, v, (8, 16, 32), (1, 2, 4), 8 ** -0.5) * weight).sum().backward()
    for mine, ref in zip(ours, (q.grad, k.grad, v.grad)):
        assert torch.allclose(mine, ref, atol=1e-6)


def test_through_the_seam_training_is_dilated_and_eval_is_full_attention():
    ids = torch.randint(3, 97, (2, 48))
    padding = torch.ones_like(ids)
    params = {"segments": (8, 16, 32), "dilations": (1, 2, 4)}
    patched, plain = make_tiny(dtype=torch.float64), make_tiny(dtype=torch.float64)
    rope_ext.patch(patched, "none", train_attention=DilatedPattern(**params))
    with torch.no_grad():
        trained = patched.train()(ids).logits
        evaluated = patched.eval()(ids).logits
        full = plain(ids).logits
    dense = reference_logits(plain, "dilated", params, ids, padding).to(trained.dtype)
    effect = (trained - full).abs().max().item()
    assert torch.allclose(trained, dense, atol=1e-6) and effect > 1e-3, f"the pattern changed the logits by {effect:.2e}"
    assert torch.allclose(evaluated, full, atol=1e-8)


def test_the_model_scale_is_read_from_its_attention_layers_and_softcap_is_refused(tmp_path):
    model = make_tiny("qwen3")
    config = build_config({"model": "m", "data": ["d"], "output_dir": "o", "target_length": 64, "train_attention": "dilated",
                           "segments": "16,32,64", "dilations": "1,2,4"})
    pattern = training_pattern(config, model)
    assert pattern.scaling == model.model.layers[0].self_attn.scaling
    assert (pattern.segments, pattern.dilations) == ((16, 32, 64), (1, 2, 4))
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        training_pattern(config, make_tiny("gemma2", attn="eager"))


def test_default_pairs_are_the_dilated_methods_own_for_the_target_length():
    config = build_config({"model": "m", "data": ["d"], "output_dir": "o", "target_length": 4 * TRAINED,
                           "train_attention": "dilated"})
    pattern = training_pattern(config, make_tiny())
    expected = rope_ext.methods.get("dilated").defaults_for(rope_ext.facts.main_spec(rope_ext.facts.model_specs(make_tiny())), 4 * TRAINED)
    assert (pattern.segments, pattern.dilations) == (expected["segments"], expected["dilations"]) == ((32, 64, 128), (1, 2, 4))


def test_a_training_step_changes_the_lora_weights(tmp_path):
    path = tiny_checkpoint(tmp_path / "m")
    config = build_config({"model": str(path), "data": ["d"], "output_dir": "o", "target_length": 2 * TRAINED,
                           "train_attention": "dilated", "segments": "16,32,64", "dilations": "1,2,4",
                           "gradient_checkpointing": False})
    model, _ = rope_ext.load(path)
    model = prepare(config, model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 250, (2, 2 * TRAINED))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert lora and len(changed) == len(lora)


BASE = {"model": "m", "data": ["d"], "output_dir": "o", "target_length": 64}


@pytest.mark.parametrize("extra,message", [
    ({"train_attention": "dilated", "segments": "32,16", "dilations": "1,2"}, "segments must be strictly ascending"),
    ({"train_attention": "dilated", "segments": "16,32", "dilations": "1"}, "must have the same length"),
    ({"train_attention": "dilated", "segments": "0,32", "dilations": "1,2"}, r"segments\[0\] must be an integer >= 1"),
    ({"train_attention": "dilated", "segments": "16,30", "dilations": "1,4"}, "segment 30 is not divisible by its dilation 4"),
    ({"train_attention": "dilated", "segments": "16,32", "dilations": "2,4"}, "the first dilation must be 1"),
    ({"train_attention": "dilated", "segments": "16,x", "dilations": "1,2"}, r"segments\[1\] must be int, got str: 'x'"),
    ({"train_attention": "dilated", "segments": 16, "dilations": 1}, "segments must be a list of integers"),
    ({"train_attention": "dilated", "segments": "16,32"}, "give segments and dilations together"),
    ({"segments": "16,32", "dilations": "1,2"}, "segments and dilations apply to train_attention dilated, not s2"),
    ({"train_attention": "full", "dilations": "1,2"}, "dilations apply to train_attention dilated, not full"),
    ({"train_attention": "sparse"}, "train_attention must be one of s2, dilated, full, got 'sparse'"),
    ({"test_attention": "sparse"}, "test_attention must be one of full, dilated"),
    ({"test_attention": "dilated"}, "test_attention dilated needs train_attention dilated"),
    ({"train_attention": "dilated", "test_attention": "dilated", "method": "yarn"}, "test_attention dilated needs method none"),
    ({"train_attention": "dilated", "sequence_parallel": 2}, "train_attention dilated does not run with sequence_parallel=2"),
    ({"train_attention": "s2", "s2_attn": False}, "s2_attn false contradicts train_attention s2"),
    ({"train_attention": "full", "s2_attn": True}, "s2_attn true contradicts train_attention full"),
])
def test_bad_settings_are_clear_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        build_config({**BASE, **extra})


def test_dilated_validation_messages_are_the_methods_own():
    with pytest.raises(ValueError) as ours:
        build_config({**BASE, "train_attention": "dilated", "segments": [32, 16], "dilations": [1, 2]})
    with pytest.raises(ValueError) as method:
        rope_ext.methods.get("dilated")(segments=(32, 16), dilations=(1, 2))
    assert str(ours.value) == str(method.value)


def test_the_older_switch_still_reads_and_a_later_source_replaces_it():
    assert build_config(BASE).pattern == "s2"
    assert build_config({**BASE, "s2_attn": False}).pattern == "full"
    assert build_config({**BASE, "s2_attn": True}, {"train_attention": "dilated"}).pattern == "dilated"
    assert build_config({**BASE, "train_attention": "dilated"}, {"s2_attn": False}).pattern == "full"
    assert build_config({**BASE, "s2_attn": False}, {"train_attention": "s2"}).pattern == "s2"


def test_flags_parse_the_issue_s_command_line():
    args = cli.build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--target-length",
                                          "8192", "--train-attention", "dilated", "--segments", "2048,4096,8192",
                                          "--dilations", "1,2,4", "--method", "none", "--test-attention", "dilated"])
    config = config_from_args(args)
    assert (config.pattern, config.segments, config.dilations, config.test_attention) == (
        "dilated", (2048, 4096, 8192), (1, 2, 4), "dilated")
    assert config.to_dict()["segments"] == [2048, 4096, 8192]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["finetune", "--train-attention", "shifted"])


def test_cli_fine_tune_with_dilated_training_and_dilated_test_attention(tmp_path, capsys):
    model, data, out = tiny_checkpoint(tmp_path / "m"), corpus(tmp_path / "c", documents=8), tmp_path / "run"
    argv = ["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--target-length",
            str(2 * TRAINED), "--max-steps", "2", "--warmup-steps", "0", "--lora-rank", "2", "--save-every", "2",
            "--cache-dir", str(tmp_path / "cache"), "--method", "none", "--train-attention", "dilated",
            "--segments", "16,32,64", "--dilations", "1,2,4", "--test-attention", "dilated", "--no-gradient-checkpointing"]
    code = cli.main(argv)
    assert code == 0, capsys.readouterr().err[-2000:]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    loaded, _ = rope_ext.load(out / "model")
    handle = rope_ext.current(loaded)
    assert handle.name == "dilated" and (handle.method.segments, handle.method.dilations) == ((16, 32, 64), (1, 2, 4))
    bad = cli.main(argv[:-1] + ["--method", "yarn"])
    assert bad == 2 and re.search("test_attention dilated needs method none", capsys.readouterr().err)
