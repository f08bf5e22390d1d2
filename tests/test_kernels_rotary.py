"""The Triton rotary kernel (``apply_rotary(kernel="triton")``) against the torch path and the
float64 references of tests/test_rotary_torch.py, on the same scenarios.

Where it runs (tests/kernel_device.py): with CUDA on CUDA tensors, compiled, in this process;
without CUDA on CPU tensors under Triton's interpreter, in a fresh process started by
``test_fresh_process_runs_this_file`` (this process imported triton before TRITON_INTERPRET=1
could be set). Without triton every test here skips; the torch path is tested regardless.

Tolerances: the two backends agree to float32 rounding (both compute in float32 and round once);
bfloat16 under the interpreter may differ by one bf16 ulp because the interpreter converts
float32 -> bfloat16 by truncation (seen with Triton 3.9), where the GPU and torch round to nearest.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from rope_ext.rotary import apply_rotary
from kernel_device import gpu_only, kernel_device, needs_triton, rerun_interpreted, triton_here
from test_rotary_torch import (
    AGREE,
    BACKWARD,
    SCENARIO_PARAMS,
    TOL,
    Scenario,
    assert_backward_is_rotation_by_minus_theta,
    assert_inplace_rotates,
    tables,
)


@pytest.mark.slow
def test_fresh_process_runs_this_file() -> None:
    rerun_interpreted(__file__)


@triton_here
@pytest.mark.parametrize("build,arg", SCENARIO_PARAMS)
def test_triton_matches_torch_and_reference(build: Callable[[Any, torch.device], Scenario], arg: Any) -> None:
    s = build(arg, kernel_device())
    for t, p, ref in zip(s.run("triton"), s.run("torch"), s.refs):
        if ref is None:
            assert t is None and p is None
            continue
        assert t.dtype == p.dtype == s.dtype and t.shape == p.shape == ref.shape and t.device == ref.device
        torch.testing.assert_close(t.double(), p.double(), **AGREE[s.dtype])
        torch.testing.assert_close(t.double(), ref, **TOL[s.dtype])


@triton_here
def test_triton_inplace() -> None:
    assert_inplace_rotates("triton", kernel_device())


@triton_here
@pytest.mark.parametrize("interleaved,r,inplace", BACKWARD)
def test_triton_backward_is_rotation_by_minus_theta(interleaved: bool, r: int, inplace: bool) -> None:
    assert_backward_is_rotation_by_minus_theta("triton", kernel_device(), interleaved, r, inplace)


@triton_here
def test_rounding_each_is_the_torch_ops_alone() -> None:
    """The Triton op rounds once; rounding="each" is refused there and sends "auto" to torch."""
    device = kernel_device()
    q = torch.randn(1, 2, 3, 8, device=device, dtype=torch.bfloat16)
    cos, sin = tables(8, 3, torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="rounding='each' needs kernel='torch'"):
        apply_rotary(q, None, cos, sin, kernel="triton", rounding="each")
    auto = apply_rotary(q, None, cos, sin, rounding="each")[0]
    assert torch.equal(auto, apply_rotary(q, None, cos, sin, kernel="torch", rounding="each")[0])


@needs_triton
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors need the interpreter, with or without CUDA on the machine; "auto" takes torch there."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"kernel='triton' needs CUDA tensors \(got cpu\)"):
        apply_rotary(q, None, *tables(8, 2, torch.float32), kernel="triton")
    assert apply_rotary(q, None, *tables(8, 2, torch.float32), kernel="auto")[0].shape == q.shape


@needs_triton
@gpu_only("compiled Triton kernel at model sizes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_compiled_kernel_matches_torch(dtype: torch.dtype, interleaved: bool) -> None:
    """Compiled kernel on CUDA vs the torch path: prefill, decode with offsets, varlen, partial."""
    dev = kernel_device()
    for B, Hq, Hk, T, d, r in ((2, 32, 8, 1000, 128, 128), (4, 32, 8, 1, 128, 128), (1, 12, 1, 77, 80, 32), (1, 8, 8, 300, 256, 256)):
        q, k = torch.randn(B, Hq, T, d, device=dev, dtype=dtype), torch.randn(B, Hk, T, d, device=dev, dtype=dtype)
        cos, sin = tables(r, 2048, dtype, device=dev)
        offsets = torch.randint(0, 1000, (B,), device=dev) if T == 1 else 7
        kw = dict(interleaved=interleaved, offsets=offsets)
        a = apply_rotary(q, k, cos, sin, kernel="triton", **kw)
        b = apply_rotary(q, k, cos, sin, kernel="torch", **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **AGREE[dtype])
    cu = torch.tensor([0, 100, 101, 600], device=dev, dtype=torch.int32)
    q, k = torch.randn(1, 32, 600, 128, device=dev, dtype=dtype), torch.randn(1, 8, 600, 128, device=dev, dtype=dtype)
    cos, sin = tables(128, 1024, dtype, device=dev)
    a = apply_rotary(q, k, cos, sin, kernel="triton", cu_seqlens=cu, interleaved=interleaved)
    b = apply_rotary(q, k, cos, sin, kernel="torch", cu_seqlens=cu, interleaved=interleaved)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **AGREE[dtype])


@needs_triton
@gpu_only("compiled Triton kernel at model sizes")
def test_gpu_backward_matches_torch() -> None:
    dev = kernel_device()
    q = torch.randn(2, 32, 513, 128, device=dev, requires_grad=True)
    k = torch.randn(2, 8, 513, 128, device=dev, requires_grad=True)
    cos, sin = tables(128, 513, torch.float32, batch=2, device=dev)
    g = [torch.randn_like(q), torch.randn_like(k)]
    grads = []
    for kernel in ("triton", "torch"):
        torch.autograd.backward(apply_rotary(q, k, cos, sin, kernel=kernel), g)
        grads.append((q.grad.clone(), k.grad.clone()))
        q.grad = k.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
