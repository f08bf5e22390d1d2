"""The compiled rotary op (``apply_rotary(kernel="compiled")``, ``rotary_ops_compiled``) and what
``kernel="auto"`` runs on the CPU, against independent references.

Stated rounding (rotary_ops_compiled's doc): the compiled op is bitwise transformers'
``apply_rotary_pos_emb`` evaluated in float32 and rounded once to the input dtype, i.e. the torch
op with rounding="each" on float32 copies of the inputs (every product and sum rounded to float32),
in every layout, offset and packing; the torch op's default rounding uses a fused multiply-add, so
the two agree to float32 rounding (AGREE). Every graph here is tiny; the first compile in a process
pays inductor's start-up (seconds), later ones well under a second.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rope_ext.kernels import rotary_ops_compiled as rc
from rope_ext.kernels import rotary_ops_torch as rt
from rope_ext.rotary import AUTO_CPU, apply_rotary, auto_backend, resolve_kernel
from test_rotary_torch import AGREE, SCENARIO_PARAMS, TOL, Scenario, randn, tables

FAST = ["B2Hq4Hk2T5d16r16h-float32", "B2Hq4Hk2T5d16r16i-bfloat16", "B2Hq2Hk2T3d32r16h-float16", "tables-flash",
        "offsets-tensor-i", "offsets-int-h", "packed-offsets-tensor", "seq-first", "strided-q"]
TORCH_OP = rt.rotary_op


def in_float32(s: Scenario) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The stated rounding: the torch op with rounding="each" on float32 copies (each product and the
    sum rounded to float32, no fused multiply-add), rounded once to the dtype."""
    up = lambda x: None if x is None else x.float()
    outs = apply_rotary(up(s.q), up(s.k), s.cos.float(), s.sin.float(), kernel="torch", rounding="each", **s.kw)
    return tuple(None if o is None else o.to(s.dtype) for o in outs)


def check_scenario(build: Callable[[Any, torch.device], Scenario], arg: Any) -> None:
    s = build(arg, torch.device("cpu"))
    for out, exact, torch_op, ref in zip(s.run("compiled"), in_float32(s), s.run("torch"), s.refs):
        if ref is None:
            assert out is None
            continue
        assert out.dtype == s.dtype and out.shape == ref.shape
        assert torch.equal(out, exact)
        torch.testing.assert_close(out, torch_op, **AGREE[s.dtype])
        torch.testing.assert_close(out.double(), ref, **TOL[s.dtype])


@pytest.mark.parametrize("build,arg", [p for p in SCENARIO_PARAMS if p.id in FAST])
def test_compiled_is_float32_transformers_rounded_once(build, arg) -> None:
    """Shapes and dtypes, partial rotary, interleaved, flash tables, offsets, cu_seqlens, bthd, strided q."""
    check_scenario(build, arg)


@pytest.mark.slow
@pytest.mark.parametrize("build,arg", SCENARIO_PARAMS)
def test_compiled_all_scenarios(build, arg) -> None:
    check_scenario(build, arg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_equals_transformers_forward_and_backward(dtype: torch.dtype) -> None:
    """Against transformers' own function in float32 (rounded to the dtype): q', k' and the
    gradients (the compiled rotation by -theta), bitwise."""
    q0, k0, gq, gk = randn(21, (2, 4, 6, 32), (2, 2, 6, 32), (2, 4, 6, 32), (2, 2, 6, 32), dtype=dtype)
    cos, sin = tables(32, 6, dtype, batch=2)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    outs = apply_rotary(q, k, cos, sin, kernel="compiled")
    torch.autograd.backward(outs, (gq, gk))
    hq, hk = q0.float().requires_grad_(), k0.float().requires_grad_()
    ref = apply_rotary_pos_emb(hq, hk, cos.float(), sin.float())
    torch.autograd.backward(ref, (gq.float(), gk.float()))
    for got, want in zip((*outs, q.grad, k.grad), (*ref, hq.grad, hk.grad)):
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))


def test_compiled_gradcheck_float64() -> None:
    q, k = (x.requires_grad_() for x in randn(22, (1, 2, 3, 8), (1, 1, 3, 8), dtype=torch.float64))
    cos, sin = tables(8, 5, torch.float64)
    off = torch.tensor([1])
    assert torch.autograd.gradcheck(lambda a, b: apply_rotary(a, b, cos, sin, kernel="compiled", offsets=off), (q, k))


def test_compiled_inplace_and_refusals() -> None:
    """inplace=True returns q and k overwritten with the out-of-place numbers; rounding="each" is refused."""
    q, k = randn(23, (1, 3, 4, 16), (1, 1, 4, 16))
    cos, sin = tables(16, 4, torch.float32)
    want = apply_rotary(q, k, cos, sin, kernel="compiled")
    a, b = q.clone(), k.clone()
    oq, ok = apply_rotary(a, b, cos, sin, kernel="compiled", inplace=True)
    assert oq is a and ok is b and torch.equal(a, want[0]) and torch.equal(b, want[1])
    with pytest.raises(ValueError, match="rounding='each' needs kernel='torch'"):
        apply_rotary(q, k, cos, sin, kernel="compiled", rounding="each")
    with pytest.raises(ValueError, match="kernel must be one of auto, triton, torch, compiled, got 'inductor'"):
        apply_rotary(q, k, cos, sin, kernel="inductor")


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty graph / sighting caches and no recorded failure, restored afterwards."""
    monkeypatch.setattr(rc, "_GRAPHS", OrderedDict())
    monkeypatch.setattr(rc, "_SEEN", {})
    monkeypatch.setattr(rc, "FAILURE", [])


def test_auto_routes(fresh_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU "auto" runs the torch op for a shape's first AUTO_AFTER - 1 calls and the compiled
    graph from then on (the torch op again for float64, rounding "each" and in-place); Triton on CUDA."""
    torch_calls = []
    monkeypatch.setattr(rt, "rotary_op", lambda *a, **kw: torch_calls.append(1) or TORCH_OP(*a, **kw))
    q, k = randn(24, (1, 2, 3, 8), (1, 1, 3, 8))
    cos, sin = tables(8, 3, torch.float32)
    outs = [apply_rotary(q, k, cos, sin) for _ in range(rc.AUTO_AFTER + 1)]
    assert len(torch_calls) == rc.AUTO_AFTER - 1 and len(rc._GRAPHS) == 1
    assert torch.equal(outs[-1][0], apply_rotary(q, k, cos, sin, kernel="compiled")[0])
    torch.testing.assert_close(outs[0][0], outs[-1][0], **AGREE[torch.float32])
    assert auto_backend(q, "once", False) == AUTO_CPU
    assert auto_backend(q, "each", False) == auto_backend(q, "once", True) == auto_backend(q.double(), "once", False) == "torch"
    assert resolve_kernel("auto", "cpu") == "torch" and resolve_kernel("compiled", "cpu") == "compiled"


def test_auto_falls_back_when_compiling_fails(fresh_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler / no inductor: "auto" keeps giving the torch op's numbers (and stops trying);
    kernel="compiled" says why it cannot run."""
    attempts = []

    def broken(*args: Any, **kwargs: Any) -> None:
        attempts.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "compile", broken)
    q, k = randn(25, (1, 2, 5, 8), (1, 1, 5, 8))
    cos, sin = tables(8, 5, torch.float32)
    want = apply_rotary(q, k, cos, sin, kernel="torch")
    for _ in range(rc.AUTO_AFTER + 2):
        got = apply_rotary(q, k, cos, sin, kernel="auto")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(attempts) == 1 and rc.FAILURE and "no C++ compiler" in rc.FAILURE[0]
    with pytest.raises(rc.CompileError, match=r"kernel='compiled' could not compile .*no C\+\+ compiler"):
        apply_rotary(q, k, cos, sin, kernel="compiled")


def test_graph_cache_is_bounded_and_keyed_by_threads(fresh_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_GRAPHS graphs are kept (least recently used out); an evicted shape recompiles to
    the same numbers; the thread count is part of the key (inductor fixes it at compile time)."""
    monkeypatch.setattr(rc, "MAX_GRAPHS", 2)
    cos, sin = tables(8, 6, torch.float32)
    xs = [randn(26 + t, (1, 1, t, 8))[0] for t in (4, 5, 6)]
    first = [apply_rotary(x, None, cos, sin, kernel="compiled")[0] for x in xs]
    assert len(rc._GRAPHS) == 2
    assert torch.equal(apply_rotary(xs[0], None, cos, sin, kernel="compiled")[0], first[0])
    threads = torch.get_num_threads()
    inputs, flags = rc._plan(xs[0], None, cos, sin, 8, False, None, None, False, False)
    key = rc._key(xs[0], None, inputs, flags)
    torch.set_num_threads(threads + 1)
    try:
        assert rc._key(xs[0], None, inputs, flags) != key
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_compiled_kernel_inside_torch_compile() -> None:
    """A function torch.compile traces may call kernel="compiled" / "auto" (which takes "compiled"
    there): the expression is traced into the caller's graph, with the same numbers as outside."""
    q, k = randn(27, (1, 2, 4, 8), (1, 1, 4, 8))
    cos, sin = tables(8, 4, torch.float32)
    outside = apply_rotary(q, k, cos, sin, kernel="compiled")
    fn = torch.compile(lambda a, b: apply_rotary(a, b, cos, sin, kernel="compiled"), fullgraph=True)
    for got, want in zip(fn(q, k), outside):
        assert torch.equal(got, want)
    auto = torch.compile(lambda a, b: apply_rotary(a, b, cos, sin, kernel="auto"), fullgraph=True)
    for got, want in zip(auto(q, k), outside):
        assert torch.equal(got, want)
