"""LongLoRA's trainable embeddings and norms as peft ``modules_to_save``: exactly LoRA + those copies
train, a saved adapter reloads with plain peft to the trained model's logits, the merged model
equals it, tied embeddings stay tied, and a checkpoint of the older in-place layout is refused."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_longlora_helpers import TRAINED, corpus, tiny_checkpoint
from torch import nn

import rope_ext
from rope_ext import cli
from rope_ext.longlora import checkpoint as ckpt
from rope_ext.longlora.config import build_config
from rope_ext.longlora.model import RECORD, load_base, prepare, trainable_modules
from rope_ext.longlora.train import train

ROOT = "base_model.model."
COPIES = ["model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
          "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mts")
    return {"model": str(tiny_checkpoint(root / "model")), "untied": str(tiny_checkpoint(root / "untied", tie=False)),
            "data": str(corpus(root / "corpus")), "root": root}


def settings(ws, out, **extra):
    base = dict(model=ws["model"], data=[ws["data"]], output_dir=str(out), target_length=2 * TRAINED, max_steps=3,
                learning_rate=3e-2, warmup_steps=0, lora_rank=4, save_every=3, cache_dir=str(ws["root"] / "cache"))
    return {**base, **extra}


def expected_trainable() -> list[str]:
    """The tiny Llama's trainable parameters in model order: the embedding copy (the tied lm_head
    shares it), then per layer LoRA A / B of q, k, v, o and the two norm copies, then the final norm."""
    copy = ".modules_to_save.default.weight"
    names = [f"{ROOT}model.embed_tokens{copy}"]
    for layer in range(2):
        prefix = f"{ROOT}model.layers.{layer}"
        names += [f"{prefix}.self_attn.{proj}_proj.lora_{ab}.default.weight" for proj in "qkvo" for ab in "AB"]
        names += [f"{prefix}.{norm}{copy}" for norm in ("input_layernorm", "post_attention_layernorm")]
    return names + [f"{ROOT}model.norm{copy}"]


def test_exactly_lora_and_the_embedding_and_norm_copies_train(workspace, tmp_path):
    config = build_config(settings(workspace, tmp_path))
    base = load_base(config)[0]
    frozen = {n: p.detach().clone() for n, p in base.named_parameters(remove_duplicate=False)}
    model = prepare(config, base)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected_trainable()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            original = name.removeprefix(ROOT).replace(".original_module.", ".").replace(".base_layer.", ".")
            assert torch.equal(p, frozen[original]), name
    inner = model.base_model.model
    assert inner.lm_head.modules_to_save.default.weight is inner.model.embed_tokens.modules_to_save.default.weight
    assert inner.lm_head.original_module.weight is inner.model.embed_tokens.original_module.weight


def test_an_untied_model_trains_its_input_embedding_copy_only(workspace, tmp_path):
    config = build_config(settings(workspace, tmp_path, model=workspace["untied"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare(config, load_base(config)[0])
    assert not [w for w in caught if "tie" in str(w.message)]
    inner = model.base_model.model
    assert type(inner.lm_head) is nn.Linear and not inner.lm_head.weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected_trainable()


def test_trainable_patterns_map_to_module_names_or_fail_clearly(workspace):
    model = rope_ext.load(workspace["model"])[0]
    assert trainable_modules(model, ("embed", "norm"), []) == COPIES
    assert trainable_modules(model, ("norm", "layers.1.input"), []) == COPIES[1:]
    with pytest.raises(ValueError, match="'embedz' occurs in no parameter name"):
        trainable_modules(model, ("embedz",), [])
    with pytest.raises(ValueError, match="selects model.layers.0.self_attn.q_proj, which LoRA adapts"):
        trainable_modules(model, ("q_proj",), ["model.layers.0.self_attn.q_proj"])
    toy = nn.Module()
    toy.norm, toy.block = nn.LayerNorm(4), nn.Module()
    toy.block.norm = nn.RMSNorm(4)
    assert trainable_modules(toy, ("norm",), []) == ["norm", "block.norm"]
    with pytest.raises(ValueError, match="peft would also take 'block.norm'"):
        trainable_modules(toy, ("norm.bias",), [])


def test_a_saved_adapter_reloads_with_plain_peft_to_the_trained_and_merged_logits(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings(workspace, out)))
    assert cli.main(["finetune", "--recipe", str(recipe), "--save-adapter"]) == 0, capsys.readouterr().err
    config = build_config(settings(workspace, out))
    trained = prepare(config, load_base(config)[0]).eval()
    weights = load_file(ckpt.checkpoint_path(out, 3) / ckpt.WEIGHTS)
    assert sorted(weights) == sorted(expected_trainable())
    trained.load_state_dict(weights, strict=False)

    adapter = out / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == COPIES and saved["ensure_weight_tying"] is True
    block = json.loads((adapter / RECORD).read_text())
    assert block["method"] == "pi" and block["params"]["factor"] == 2.0
    base = rope_ext.load(workspace["model"])[0]
    base_embedding = base.get_input_embeddings().weight.detach().clone()
    rope_ext.patch(base, block["method"], **block["params"])
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    merged = rope_ext.load(out / "model")[0]

    ids = torch.randint(3, 259, (2, 2 * TRAINED), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(ids).logits
        assert (loaded(ids).logits - expected).abs().max() <= 1e-6
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    inner = loaded.base_model.model
    assert not torch.equal(inner.model.embed_tokens.modules_to_save.default.weight, base_embedding)
    assert inner.lm_head.modules_to_save.default.weight is inner.model.embed_tokens.modules_to_save.default.weight
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and rope_ext.current(merged).name == "pi"


def test_save_adapter_needs_lora():
    with pytest.raises(ValueError, match="save_adapter needs lora"):
        build_config({"model": "m", "data": ["d"], "output_dir": "o", "target_length": 64, "lora": False, "save_adapter": True})


def test_a_checkpoint_that_trained_embeddings_in_place_is_refused_by_name(workspace, tmp_path):
    out = tmp_path / "run"
    train(build_config(settings(workspace, out, max_steps=4, save_every=2, stop_after=2, merge=False)))
    path = ckpt.checkpoint_path(out, 2)
    weights = load_file(path / ckpt.WEIGHTS)
    save_file({n.replace(f".{ckpt.COPY}.", "."): t for n, t in weights.items()}, str(path / ckpt.WEIGHTS))
    log = (out / "train_log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"trained base_model\.model\.model\.embed_tokens\.weight in place, this one trains "
                                         r"a peft copy \(modules_to_save\): start a fresh run"):
        train(build_config(settings(workspace, out, max_steps=4, save_every=2, merge=False, resume=True)))
    assert (out / "train_log.jsonl").read_text() == log
