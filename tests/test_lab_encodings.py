"""Train-time position encodings of the lab: the registry, LabConfig / CLI wiring, strict checkpoint
loading, and the properties every attention-bias encoding (KERPLE, FIRE, CoPE) must keep: padding
and a KV cache change nothing, the passkey fine-tune keeps the encoding."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from rope_ext.commands.pretrain import encoding_names
from rope_ext.cli import main
from rope_ext.eval import encodings
from rope_ext.eval.lab import LabConfig, build_model, lab_config, load_lab, pretrain, trained_encoding
from rope_ext.eval.lab_passkey import PasskeyLabConfig, finetune_passkey
from rope_ext.eval.ppl import perplexity
from test_lab_enc_xpos import train_save_load

ENC_LAB = dict(context=16, layers=2, hidden=32, heads=2, intermediate=32, steps=5, batch=4, warmup=1)
MINE = [("kerple_log", ()), ("kerple_power", ()), ("fire", (("init_threshold", 8.0),)), ("cope", ())]


def check_lab_run(tmp_path: Path, corpus: str, position: str, pe_params: tuple = ()) -> Any:
    """The loss falls, the reloaded model's logits equal the trained one's bitwise, ppl at 4x runs."""
    model, loaded, losses = train_save_load(tmp_path, corpus, position, **dict(pe_params))
    assert losses[-1] < losses[0]
    assert trained_encoding(loaded) == encodings.build(position, dict(pe_params))
    x = torch.randint(3, 259, (2, 4 * ENC_LAB["context"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    record = perplexity(loaded, [x[0]], ["4x"], ["none"], sliding=False, progress=False)[0]
    assert record["key"]["length"] == 64 and 1 < record["result"]["ppl"] < float("inf")
    return loaded


def tiny(position: str, pe_params: tuple = (), **overrides: Any) -> torch.nn.Module:
    return build_model(LabConfig(**{**ENC_LAB, **overrides}, position=position, pe_params=pe_params), 259).eval()


def test_registry_names_build_and_errors():
    assert {"kerple_log", "kerple_power", "fire", "cope"} <= set(encodings.names())
    assert encodings.get("fire").paper.startswith("Li et al. 2023")
    with pytest.raises(ValueError, match="unknown position encoding 'kerple'.*kerple_log"):
        encodings.get("kerple")
    with pytest.raises(ValueError, match="unknown parameter 'depth' for encoding 'fire'; allowed: width, init_c"):
        encodings.build("fire", {"depth": 2})
    with pytest.raises(ValueError, match="already registered"):
        encodings.register("cope")(type("Other", (), {}))
    assert encodings.build("cope", {"npos": 40}) == encodings.get("cope")(npos=40)


def test_cli_choices_are_the_registry():
    assert encoding_names() == encodings.names()


def test_lab_config_pe_params():
    with pytest.raises(ValueError, match="position 'rope' takes none"):
        LabConfig(position="rope", pe_params=(("eps", 0.1),))
    with pytest.raises(ValueError, match="position must be one of rope, alibi, nope, .*kerple_log"):
        LabConfig(position="kerple")
    with pytest.raises(ValueError, match="names a parameter twice"):
        LabConfig(position="fire", pe_params=(("width", 4), ("width", 8)))
    with pytest.raises(ValueError, match="pairs"):
        LabConfig(position="fire", pe_params={"width": 4})
    with pytest.raises(ValueError, match="eps must be > 0"):
        LabConfig(position="kerple_log", pe_params=(("eps", 0.0),))
    plain = LabConfig()
    fields = dataclasses.asdict(plain)
    del fields["pe_params"]
    expected = "lm-rope-T128-s0-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    assert plain.key() == expected  # configs from before pe_params keep their cache directory
    fire = LabConfig(position="fire", pe_params=(("width", 8),))
    assert fire.key() != LabConfig(position="fire").key() and hash(fire) == hash(LabConfig(position="fire", pe_params=(("width", 8),)))


@pytest.fixture
def captured(monkeypatch):
    from rope_ext.eval import lab, runner

    seen = []
    monkeypatch.setattr(lab, "pretrain", lambda cfg, out: seen.append(cfg) or out)
    monkeypatch.setattr(lab, "is_complete", lambda path: str(path) == "lm-dir")
    monkeypatch.setattr(runner, "set_threads", lambda threads: 1)
    return seen


def test_pretrain_cli_parses_pe_and_params(captured, tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "a"), "--pe", "fire", "--pe-param", "width=16", "--pe-param", "init_c=0.5"]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--position", "kerple_power"]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "c"), "--pe", "alibi", "--max-bias", "4"]) == 0
    assert captured == [LabConfig(position="fire", pe_params=(("width", 16), ("init_c", 0.5))),
                        LabConfig(position="kerple_power"), LabConfig(position="alibi", max_bias=4.0)]
    for flags, message in ((["--pe", "fire", "--pe-param", "width"], "expected NAME=VALUE"),
                           (["--pe", "cope", "--pe-param", "depth=2"], "unknown parameter 'depth' for encoding 'cope'; allowed: npos"),
                           (["--pe-param", "eps=0.1"], "position 'rope' takes none"),
                           (["--task", "passkey", "--init", "lm-dir", "--pe-param", "eps=0.1"], "--pe-param: --task lm only")):
        assert main(["pretrain", "--out", str(tmp_path / "d"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "d"), "--pe", "kerple"]) == 2
    assert "invalid choice: 'kerple'" in capsys.readouterr().err
    assert len(captured) == 3 and not (tmp_path / "d").exists()


@pytest.mark.parametrize("position,pe_params", MINE)
def test_pretrain_saves_and_load_lab_restores(tmp_path, text_corpus, position, pe_params):
    args = ["pretrain", "--out", str(tmp_path / "lm"), "--pe", position, "--context", "16", "--layers", "1", "--hidden", "32",
            "--heads", "2", "--intermediate", "32", "--steps", "2", "--batch", "2", "--corpus", text_corpus, "--threads", "1"]
    args += [f"--pe-param={name}={value}" for name, value in pe_params]
    assert main(args) == 0
    assert lab_config(tmp_path / "lm") == LabConfig(**{**ENC_LAB, "layers": 1, "steps": 2, "batch": 2, "warmup": 20}, position=position,
                                                    pe_params=pe_params, corpus=text_corpus)
    saved = load_file(tmp_path / "lm" / "model.safetensors")
    model, tok = load_lab(tmp_path / "lm")
    assert model.config._attn_implementation == f"lab_{position}" and tok("a", add_special_tokens=False)["input_ids"] == [100]
    ours = {k: v for k, v in model.state_dict().items() if ".lab_pe." in k}
    assert ours and all(torch.equal(v, saved[k]) for k, v in ours.items())


def test_load_lab_is_strict(tmp_path, text_corpus):
    model, _, _ = train_save_load(tmp_path, text_corpus, "kerple_log")
    weights = tmp_path / "kerple_log" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.self_attn.lab_pe.r2"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.lab_pe.r2'\], unexpected keys \[\]"):
        load_lab(tmp_path / "kerple_log")
    record = json.loads((tmp_path / "kerple_log" / "lab.json").read_text())
    record["config"]["position"] = "cope"
    (tmp_path / "kerple_log" / "lab.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"missing keys \[.*lab_pe.embeddings.*\], unexpected keys \[.*lab_pe.r1"):
        load_lab(tmp_path / "kerple_log")


def test_passkey_finetune_keeps_the_encoding(tmp_path, text_corpus):
    cfg = LabConfig(**{**ENC_LAB, "context": 64, "layers": 1, "steps": 1}, position="cope", corpus=text_corpus)
    lm = pretrain(cfg, tmp_path / "lm")
    out = finetune_passkey(lm, PasskeyLabConfig(steps=2, batch=2, corpus=text_corpus), tmp_path / "pk")
    assert lab_config(out) == cfg
    before, _ = load_lab(lm)
    tuned, _ = load_lab(out)
    assert trained_encoding(tuned) == encodings.build("cope", {})
    embeddings = [m.model.layers[0].self_attn.lab_pe.embeddings for m in (before, tuned)]
    assert embeddings[0].shape == (16, 65) and not torch.equal(*embeddings)  # fine-tuned, saved, reloaded


@pytest.mark.parametrize("position,pe_params", MINE)
def test_padding_and_kv_cache_change_nothing(position, pe_params):
    model = tiny(position, pe_params)
    with torch.no_grad():
        for p in model.parameters():  # CoPE's embeddings start at zero; give every encoding a non-trivial state
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(x).logits
        left = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
        assert torch.allclose(left, plain, atol=1e-5)
        out = model(x[:, :8], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(8, 12):
            out = model(x[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        assert torch.allclose(torch.cat(steps, dim=1), plain, atol=1e-5)


@pytest.mark.parametrize("position,pe_params", MINE)
def test_long_prompts_by_query_blocks_equal_one_block(position, pe_params, monkeypatch):
    """A prompt whose (B, H, Lq, Lk) pairs exceed PAIRS_PER_CALL runs by blocks of query rows: same
    logits and gradients as one call (padding included)."""
    from rope_ext.eval.encodings import base

    model = tiny(position, pe_params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[0, :4] = 0

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        (logits * mask[..., None]).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = run()
    monkeypatch.setattr(base, "PAIRS_PER_CALL", 2 * 2 * 20 * 3)  # 3 query rows per call
    blocks, block_grads = run()
    assert torch.allclose(blocks, whole, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(block_grads, whole_grads)), max(
        float((a - b).abs().max()) for a, b in zip(block_grads, whole_grads))
