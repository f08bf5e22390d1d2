"""`rope-ext export`: the engine's settings reproduce what rope_ext.patch runs.

vLLM: transformers' own ROPE_INIT_FUNCTIONS on a config carrying the exported hf_overrides give the
patched model's inv_freq and attention scaling (vLLM's YaRN magnitude recomputed from its formula).
llama.cpp: ggml's RoPE / YaRN formula recomputed here from the printed flags gives the same. A GGUF
written reads back with the metadata set and byte-identical tensors; refusals write nothing."""
from __future__ import annotations

import argparse
import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import rope_ext
from rope_ext import export
from rope_ext.commands import export as command
from tests.conftest import TINY, make_tiny

CASES = [
    ("none", {}),
    ("pi", {"factor": 4.0}),
    ("ntk", {"factor": 4.0}),
    ("ntk", {"base": 50000.0}),
    ("yarn", {"factor": 4.0}),
    ("yarn", {"factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.5}),
    ("llama3", {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0}),
]
LLAMA_CPP_CASES = [c for c in CASES if c[0] != "llama3"]
REFUSED_EVERYWHERE = [("dynamic_ntk", {"factor": 2.0}), ("ntk_by_parts", {"factor": 2.0}), ("dynamic_yarn", {"factor": 2.0}),
                      ("rerope", {"window": 8}), ("leaky_rerope", {"window": 8, "k": 4.0}),
                      ("self_extend", {"group_size": 2, "window": 8}), ("alibi", {}), ("yarn", {"factor": 2.0, "logn": True}),
                      ("pi", {"factor": 2.0, "sinks": 2, "cache_window": 8})]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaConfig(**TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def facts(model_dir):
    return export.model_facts(model_dir)


def patched_frequencies(method: str, params: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) the patched tiny llama rotates with."""
    model = make_tiny("llama")
    rope_ext.patch(model, method, **params)
    rotary = model.model.rotary_emb
    return rotary.inv_freq.clone(), float(rotary.attention_scaling)


def settings(facts, method: str, params: dict, engine: str, context: int | None = None) -> dict:
    """The engine's settings; an explicit NTK base (no fixed reach) serves 64 tokens unless told."""
    bound = export.bind(method, params, facts)
    (export.vllm if engine == "vllm" else export.llama_cpp).check(bound)
    if context is None and "base" in params:
        context = 64
    build = export.vllm_settings if engine == "vllm" else export.llama_cpp_settings
    return build(bound, facts, export.context_length(bound, context))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    command.add_parser(p.add_subparsers())
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(["export", *map(str, argv)])
    return args.func(args)


@pytest.mark.parametrize(("method", "params"), CASES, ids=lambda x: str(x))
def test_vllm_overrides_reproduce_the_patch(facts, method, params):
    overrides = settings(facts, method, params, "vllm")["hf_overrides"]
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    rope = config.rope_parameters
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    if init is None:
        inv_freq, scaling = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = init(config, "cpu")
    expected, expected_scaling = patched_frequencies(method, params)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(expected_scaling, rel=1e-9)
    if rope["rope_type"] == "yarn":  # vLLM: cos/sin x yarn_get_mscale(factor) * attn_factor
        vllm_mscale = (0.1 * math.log(rope["factor"]) + 1.0) * rope.get("attn_factor", 1.0)
        assert vllm_mscale == pytest.approx(expected_scaling, rel=1e-9)


def test_vllm_max_model_len_is_what_vllm_derives(facts):
    """vLLM's derived limit: yarn original x factor, linear max_position x factor, default / llama3 max_position."""
    for method, params in CASES:
        out = settings(facts, method, params, "vllm")
        over, length = out["hf_overrides"], out["max_model_len"]
        rope = over["rope_parameters"]
        derived = over.get("max_position_embeddings", TINY["max_position_embeddings"])
        if rope["rope_type"] in ("linear", "yarn"):
            derived = rope.get("original_max_position_embeddings", derived) * rope["factor"]
        assert length <= derived
        assert f"--max-model-len {length}" in out["command"]


def ggml_frequencies(flags: list[str], override_kv: list[str], n_rot: int) -> tuple[np.ndarray, float]:
    """theta_i per position (p = 1) and the cos/sin magnitude llama.cpp computes from these flags
    (ggml-cpu ops.cpp rope_yarn, rope_yarn_ramp, ggml_rope_yarn_corr_dims; llama-context.cpp)."""
    opts = dict(zip(flags[::2], flags[1::2]))
    f32 = np.float32
    base = f32(float(opts["--rope-freq-base"]))
    scaling = opts["--rope-scaling"]
    freq_scale = f32(1.0) if scaling == "none" else f32(1.0) / f32(float(opts["--rope-scale"]))
    theta_scale = f32(base ** (f32(-2.0) / f32(n_rot)))
    theta = np.empty(n_rot // 2, dtype=f32)
    value = f32(1.0)
    for i in range(n_rot // 2):  # ggml: theta *= theta_scale, in float
        theta[i] = value
        value = f32(value * theta_scale)
    attn = f32(1.0)
    for kv in override_kv:
        key, _, typed = kv.partition("=")
        assert key.endswith(".rope.scaling.attn_factor") and typed.startswith("float:")
        attn = f32(float(typed[len("float:"):]))
    ext = f32(float(opts.get("--yarn-ext-factor", 0.0))) if scaling == "yarn" else f32(0.0)
    interp = freq_scale * theta
    if ext == 0:
        return interp, float(attn)

    def corr_dim(n_rot_rotations: float) -> float:
        return n_rot * math.log(int(opts["--yarn-orig-ctx"]) / (n_rot_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(float(opts["--yarn-beta-fast"]))))
    high = min(n_rot - 1.0, math.ceil(corr_dim(float(opts["--yarn-beta-slow"]))))
    y = (np.arange(n_rot // 2, dtype=f32) - f32(low)) / f32(max(0.001, high - low))
    ramp_mix = (1 - np.clip(y, 0, 1)) * ext
    mscale = attn * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    return interp * (1 - ramp_mix) + theta * ramp_mix, float(mscale)


@pytest.mark.parametrize(("method", "params"), LLAMA_CPP_CASES, ids=lambda x: str(x))
def test_llama_cpp_flags_reproduce_the_patch(facts, method, params):
    out = settings(facts, method, params, "llama.cpp")
    theta, mscale = ggml_frequencies(out["flags"], out["override_kv"], facts.spec.rotary_dim)
    expected, expected_scaling = patched_frequencies(method, params)
    np.testing.assert_allclose(theta, expected.numpy(), rtol=2e-6)
    assert mscale == pytest.approx(expected_scaling, rel=1e-6)
    assert out["flags"][-2:] == ["-c", str(out["metadata"]["context_length"])]


@pytest.mark.parametrize("engine", export.ENGINES)
@pytest.mark.parametrize(("method", "params"), REFUSED_EVERYWHERE, ids=lambda x: str(x))
def test_refused_methods_name_the_method_and_the_exportable_ones(facts, engine, method, params):
    with pytest.raises(ValueError, match=method) as err:
        settings(facts, method, params, engine)
    assert "none" in str(err.value) and "yarn" in str(err.value)


@pytest.mark.parametrize(("method", "params"), [("llama3", {"factor": 4.0}), ("yarn", {"factor": 4.0, "truncate": False})])
def test_llama_cpp_refuses_what_flags_cannot_express(facts, method, params):
    with pytest.raises(ValueError, match="llama.cpp"):
        settings(facts, method, params, "llama.cpp")


def test_bad_values_are_refused(facts):
    with pytest.raises(ValueError, match="factor"):
        settings(facts, "yarn", {"factor": -1.0}, "vllm")
    with pytest.raises(ValueError, match="exceeds the 128 tokens"):
        settings(facts, "yarn", {"factor": 4.0}, "vllm", context=129)
    with pytest.raises(ValueError, match="--context-length"):
        export.context_length(export.bind("ntk", {"base": 50000.0}, facts), None)
    with pytest.raises(TypeError, match="unknown parameter"):
        settings(facts, "pi", {"factr": 2.0}, "llama.cpp")
    with pytest.raises(ValueError, match="engine must be one of"):
        export.settings(facts.path, "pi", {"factor": 2.0}, "tgi")


def test_command_vllm_json_out(model_dir, tmp_path, capsys):
    out = tmp_path / "overrides.json"
    assert run(model_dir, "--method", "yarn", "--target-length", "4x", "--to", "vllm", "--out", out, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed["hf_overrides"]
    assert printed["hf_overrides"]["rope_parameters"]["factor"] == 4.0 and printed["max_model_len"] == 128
    with pytest.raises(FileExistsError, match="--force"):
        run(model_dir, "--method", "pi", "--factor", "2", "--to", "vllm", "--out", out)
    assert run(model_dir, "--method", "pi", "--factor", "2", "--to", "vllm", "--out", out, "--force") == 0
    assert json.loads(out.read_text())["rope_parameters"]["rope_type"] == "linear"


def test_command_refusals_write_nothing(model_dir, tmp_path):
    cases = [
        (["--method", "rerope", "--param", "window=8", "--to", "vllm", "--out", tmp_path / "a.json"], "rerope"),
        (["--method", "self_extend", "--to", "llama.cpp", "--out", tmp_path / "a.gguf"], "self_extend cannot be exported"),
        (["--method", "pi", "--factor", "2", "--param", "factor=3", "--to", "vllm", "--out", tmp_path / "b.json"], "twice"),
        (["--method", "pi", "--factor", "2", "--to", "llama.cpp", "--out", tmp_path / "c.gguf"], "convert_hf_to_gguf"),
        (["--method", "pi", "--factor", "2", "--to", "vllm", "--out", tmp_path / "d.txt"], ".json"),
        (["--method", "pi", "--factor", "2", "--to", "vllm", "--context-length", "1k", "--out", tmp_path / "e.json"], "exceeds"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            run(model_dir, *argv)
    assert list(tmp_path.iterdir()) == []


def tiny_gguf(path) -> None:
    """A GGUF with llama metadata and three tensors of different types (no tokenizer: metadata tests only)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_context_length(32)
    writer.add_rope_freq_base(10000.0)
    writer.add_string("general.name", "tiny")
    writer.add_array("tiny.list", [1, 2, 3])
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((4, 8)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((3, 5)).astype(np.float16))
    writer.add_tensor("c.weight", np.arange(64, dtype=np.int8), raw_dtype=gguf.GGMLQuantizationType.I8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}, reader


def test_write_gguf_sets_metadata_and_keeps_tensors(facts, tmp_path):
    source = tmp_path / "src.gguf"
    tiny_gguf(source)
    before = source.read_bytes()
    metadata = settings(facts, "yarn", {"factor": 4.0, "attention_factor": 1.5}, "llama.cpp")["metadata"]
    out = export.write_gguf(source, tmp_path / "out.gguf", metadata)
    fields, reader = read_fields(out)
    old_fields, old_reader = read_fields(source)
    assert fields["llama.rope.scaling.type"] == "yarn"
    assert fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert fields["llama.rope.scaling.original_context_length"] == TINY["max_position_embeddings"]
    assert fields["llama.rope.scaling.attn_factor"] == pytest.approx(1.5 / (0.1 * math.log(4.0) + 1), rel=1e-6)
    assert fields["llama.context_length"] == 4 * TINY["max_position_embeddings"]
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    changed = {k for k in old_fields if old_fields[k] != fields.get(k)}
    assert changed == {"llama.context_length"}
    assert [t.name for t in reader.tensors] == [t.name for t in old_reader.tensors]
    for new, old in zip(reader.tensors, old_reader.tensors):
        assert new.tensor_type == old.tensor_type and bytes(new.data) == bytes(old.data)
    assert source.read_bytes() == before
    with pytest.raises(FileExistsError, match="--force"):
        export.write_gguf(source, out, metadata)
    with pytest.raises(ValueError, match="never overwritten"):
        export.write_gguf(source, source, metadata, force=True)
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src.gguf"]


@pytest.mark.slow
def test_smollm2_gguf_export(tmp_path, capsys):
    out = tmp_path / "smollm2-yarn.gguf"
    assert run("smollm2", "--method", "yarn", "--factor", "4", "--to", "llama.cpp", "--out", out, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert "--rope-scaling yarn" in printed["command"]
    fields, reader = read_fields(out)
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.context_length"] == 4 * 8192
    assert fields["llama.rope.scaling.original_context_length"] == 8192
    _, source = read_fields(rope_ext.models.shipped_gguf())
    for new, old in zip(reader.tensors, source.tensors, strict=True):
        assert new.name == old.name and bytes(new.data) == bytes(old.data)
