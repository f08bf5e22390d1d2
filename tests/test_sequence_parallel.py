"""Sequence parallelism (DeepSpeed Ulysses) for the fine-tune: refusals, S2-Attn over a process's
heads, and 2-process CPU (gloo) runs against one process.

The 2-process tests need DeepSpeed (``pip install deepspeed``); where it is not importable they are
skipped with that reason. On CPU, DeepSpeed's communication backend compiles its shared-memory op
with the C++ compiler on first use (about 90 s on 2 cores, then cached in ~/.cache/torch_extensions).
Run as a script under torchrun, this file is the worker of those tests.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rope_ext.longlora import sequence_parallel as sp
from rope_ext.longlora.config import build_config
from rope_ext.longlora.s2attn import S2Attn, shifted_sparse_attention

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED or shutil.which("c++") is None,
    reason="the 2-process Ulysses runs need DeepSpeed (pip install deepspeed, in the train extra) and a C++ compiler "
           "(on CPU DeepSpeed compiles its communication op on first use)")
LENGTH = 64
REPO = Path(__file__).resolve().parents[1]


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference causal attention with GQA, (B, H, L, d) -> (B, L, H, d)."""
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 2), (6, 3, 3), (6, 6, 3), (8, 4, 4), (8, 2, 2)])
@pytest.mark.parametrize("wrap", [False, True])
def test_s2_attn_on_each_process_heads_equals_s2_attn_on_all_heads(heads, kv_heads, size, wrap):
    q, k, v = torch.randn(2, heads, 24, 8), torch.randn(2, kv_heads, 24, 8), torch.randn(2, kv_heads, 24, 8)
    pattern = S2Attn(group_size_ratio=0.25, wrap=wrap)
    whole = shifted_sparse_attention(q, k, v, causal, 6, shift=True, wrap=wrap)
    local, kv_local = heads // size, kv_heads // size
    parts = [sp.HeadShard(pattern, r * local, heads).attend(q[:, r * local:(r + 1) * local], k[:, r * kv_local:(r + 1) * kv_local],
                                                            v[:, r * kv_local:(r + 1) * kv_local], causal) for r in range(size)]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-6, rtol=0)


def test_shards_carry_global_positions_and_globally_shifted_labels():
    batch = torch.arange(16).reshape(2, 8)
    pieces = [sp.shard(batch, sp.Place(size=2, rank=r, world=2)) for r in range(2)]
    ids, pos, labels = (torch.cat(parts, dim=1) for parts in zip(*pieces))
    assert torch.equal(ids, batch) and torch.equal(pos, torch.arange(8).expand(2, 8))
    assert torch.equal(labels[:, :-1], batch[:, 1:]) and (labels[:, -1] == -100).all()
    logits = torch.randn(2, 8, 20)
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten() % 20)
    terms = [sp.shard_loss(logits[:, 4 * r:4 * r + 4], torch.where(labels[:, 4 * r:4 * r + 4] >= 0, labels[:, 4 * r:4 * r + 4] % 20, -100),
                           sp.Place(2, r, 2), 8) for r in range(2)]
    torch.testing.assert_close(sum(terms) / 2, whole)


def test_limits_are_clear_errors(tiny):
    place = sp.Place(size=2, rank=0, world=2)
    with pytest.raises(ValueError, match="unpadded batches"):
        sp.shard(torch.ones(1, 8, dtype=torch.long), place, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="sequence_parallel=3 must divide target_length=8"):
        sp.shard(torch.ones(1, 8, dtype=torch.long), sp.Place(size=3, rank=0, world=3))
    model = tiny()
    with pytest.raises(ValueError, match="must divide the model's num_attention_heads=4"):
        sp.check_model(model.config, 3)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        sp.check_model(tiny(num_attention_heads=4, num_key_value_heads=2).config, 4)
    with pytest.raises(ValueError, match="not eager"):
        sp.check_model(tiny(attn="eager").config, 2)
    with pytest.raises(ValueError, match="needs a multiple of 2 processes, got 1"):
        sp.check_world(2, 1)


def test_config_refuses_a_size_that_does_not_divide_the_length_and_names_the_install(monkeypatch):
    base = dict(model="m", data=["d"], output_dir="o", target_length=64)
    assert build_config(base).sequence_parallel == 1
    with pytest.raises(ValueError, match="sequence_parallel must be an integer >= 1"):
        build_config({**base, "sequence_parallel": 0})
    with pytest.raises(ValueError, match="must divide target_length=64"):
        build_config({**base, "sequence_parallel": 3})
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install deepspeed"):
        build_config({**base, "sequence_parallel": 2})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPE_EXT_TEST_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), __file__, str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@needs_deepspeed
def test_two_processes_give_the_logits_and_gradients_of_one(tmp_path):
    results = _torchrun(tmp_path)
    assert set(results) == {"yarn", "rerope", "yarn+s2attn", "dynamic_ntk+logn"}
    for case, found in results.items():
        assert found["max_abs_logit_diff"] <= 1e-5, (case, found)
        assert found["max_grad_rel_diff"] <= 1e-5, (case, found)


@pytest.mark.slow
@needs_deepspeed
def test_two_process_fine_tune_of_the_lab_recipe_has_the_losses_of_one_process(tmp_path):
    from test_longlora_helpers import corpus

    from rope_ext.eval.lab import LabConfig, build_model, save_lab
    from rope_ext.eval.tokens import byte_tokenizer
    from rope_ext.longlora.config import load_recipe
    from rope_ext.longlora.train import train

    tokenizer = byte_tokenizer()
    lab = LabConfig(context=32, layers=2, hidden=32, heads=4, intermediate=64, steps=1)
    model = save_lab(build_model(lab, len(tokenizer)), tokenizer, tmp_path / "lab", {"config": {}})
    recipe = {**load_recipe(REPO / "recipes" / "lab-128-to-512.yaml"), "model": str(model), "data": [str(corpus(tmp_path / "data"))],
              "target_length": 64, "batch_size": 2, "max_steps": 3, "warmup_steps": 1, "evaluate": False, "merge": False,
              "save_every": 3, "cache_dir": str(tmp_path / "cache")}
    train(build_config({**recipe, "output_dir": str(tmp_path / "one")}))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "two"), "sequence_parallel": 2}))
    run = subprocess.run([sys.executable, "-m", "rope_ext.cli", "finetune", "--recipe", str(tmp_path / "two.yaml"), "--num-processes", "2"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert "registered with DeepSpeed directly" in run.stderr
    one, two = (_losses(tmp_path / name) for name in ("one", "two"))
    assert len(one) == 3 and one[-1] != one[0]
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-4, (one, two)


@needs_deepspeed
def test_a_fine_tune_with_fewer_processes_than_the_group_fails_before_writing(tmp_path):
    from test_longlora_helpers import corpus, tiny_checkpoint

    from rope_ext.longlora.train import train

    out = tmp_path / "out"
    config = build_config(dict(model=str(tiny_checkpoint(tmp_path / "m")), data=[str(corpus(tmp_path / "d"))], output_dir=str(out),
                               target_length=64, sequence_parallel=2, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match="sequence_parallel=2 needs a multiple of 2 processes, got 1; launch with --num-processes 2"):
        train(config)
    assert not out.exists()


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _worker_logits(out: Path) -> None:
    """Each rank: the full-sequence model (reference) and the Ulysses model on its shard."""
    import rope_ext
    from conftest import make_tiny, method_params

    torch.distributed.init_process_group("gloo")
    cases = {"yarn": ("yarn", {}, None), "rerope": ("rerope", {"window": 16}, None),
             "yarn+s2attn": ("yarn", {}, S2Attn(group_size_ratio=0.25)), "dynamic_ntk+logn": ("dynamic_ntk", {"logn": True}, None)}
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, LENGTH))
    results = {}
    for case, (method, given, pattern) in cases.items():
        runs = []
        for parallel in (False, True):
            model = make_tiny(use_cache=False)
            rope_ext.patch(model, method, train_attention=pattern, **method_params(method, model, LENGTH, **given))
            model.train(pattern is not None)
            if parallel:
                place = sp.enable(model, 2, batch_size=2, length=LENGTH)
                tokens, positions, labels = sp.shard(ids, place)
                logits = model(input_ids=tokens, position_ids=positions).logits
                sp.shard_loss(logits, labels, place, LENGTH).backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                for g in grads.values():
                    torch.distributed.all_reduce(g)
                    g /= 2
                cut = slice(place.sp_rank * LENGTH // 2, (place.sp_rank + 1) * LENGTH // 2)
            else:
                output = model(input_ids=ids, labels=ids)
                output.loss.backward()
                logits = output.logits
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            runs.append((logits.detach(), grads))
        (full, ref), (part, got) = runs
        diff = torch.tensor([(part - full[:, cut]).abs().max().item(),
                             max(((got[n] - g).norm() / g.norm()).item() for n, g in ref.items())])
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        results[case] = {"max_abs_logit_diff": diff[0].item(), "max_grad_rel_diff": diff[1].item()}
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker_logits(Path(sys.argv[1]))
