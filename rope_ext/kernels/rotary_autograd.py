"""The middle rotary layer: the backend table, the argument checks and the one autograd Function.

Three thin layers, as flash-attn's rotary: the ops (``rotary_ops_torch.rotary_op``,
``rotary_ops_triton.rotary_op``, ``rotary_ops_compiled.rotary_op``: the computation, one signature,
arguments assumed valid; plus ``rotary_ops_compiled.auto_op``, the internal backend ``AUTO_CPU``
that kernel="auto" runs on the CPU); this module (``apply_op``: check everything, then call one
backend's op, through ``RotaryFunction`` when a gradient is wanted); ``rope_ext.rotary.apply_rotary``
(the dispatcher users call: picks the backend for the device).

The gradient of a rotation by theta is the rotation of the gradient by -theta (R(theta)^T =
R(-theta)), so the backward is the same op with ``conjugate=True`` (and the same rounding). cos/sin
are treated as constants (no gradient), as in flash-attn and Liger. With ``inplace=True`` q and k
are overwritten and returned (autograd knows: ``mark_dirty``). Without autograd in play (no_grad,
or inputs that do not require grad) the op is called directly, which keeps decoding's host
overhead small.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from . import rotary_ops_torch

BACKENDS = {"triton": ".rotary_ops_triton", "torch": ".rotary_ops_torch", "compiled": ".rotary_ops_compiled"}  # backend -> module of its rotary_op
AUTO_CPU = "compiled_auto"  # what kernel="auto" runs on the CPU: rotary_ops_compiled.auto_op
ROUNDS_ONCE = ("triton", "compiled", AUTO_CPU)  # backends without rounding="each"
ROUNDINGS = ("once", "each")
LAYOUTS = ("bhtd", "bthd")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OPS: dict[str, Callable] = {"torch": rotary_ops_torch.rotary_op}  # imported here: callable inside torch.compile


def op(backend: str) -> Callable:
    """The backend's ``rotary_op`` (``AUTO_CPU``: the compiled module's ``auto_op``); its module is
    imported on first use (Triton's imports triton)."""
    fn = _OPS.get(backend)
    if fn is None:
        name = "compiled" if backend == AUTO_CPU else backend
        if name not in BACKENDS:
            raise ValueError(f"rotary backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        module = importlib.import_module(BACKENDS[name], __package__)
        fn = _OPS[backend] = module.auto_op if backend == AUTO_CPU else module.rotary_op
    return fn


def _shape(x: torch.Tensor, name: str, seq_first: bool) -> tuple[int, int, int]:
    if x.dim() != 4:
        layout = "(B, T, H, d)" if seq_first else "(B, H, T, d)"
        raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(x.shape)}")
    b, a1, a2, d = x.shape
    return (b, a1, d) if seq_first else (b, a2, d)


def check_args(q, k, cos, sin, rotary_dim, offsets, cu_seqlens, layout, rounding="once") -> int:
    """Validate everything before any write; returns the rotary dimension r."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    x0 = q if q is not None else k
    if x0 is None:
        raise ValueError("q and k are both None: nothing to rotate")
    seq_first = layout == "bthd"
    b, t, d = _shape(x0, "q" if q is not None else "k", seq_first)
    if q is not None and k is not None and (_shape(k, "k", seq_first) != (b, t, d) or k.dtype != q.dtype or k.device != q.device):
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} in batch, length, head dim, dtype and device")
    shape = cos.shape
    if shape != sin.shape or len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1 and shape[0] != b):
        raise ValueError(f"cos/sin must both be (T, w), (1, T, w) or ({b}, T, w); got {tuple(shape)} and {tuple(sin.shape)}")
    if cos.device != x0.device:
        raise ValueError(f"cos/sin are on {cos.device}, q/k on {x0.device}")
    w = shape[-1]
    r = w if rotary_dim is None else rotary_dim
    if (r != w and r != 2 * w) or r % 2 or not 0 < r <= d:
        raise ValueError(f"rotary_dim={r} must be even, <= head dim {d}, and equal the tables' width {w} (HF) or twice it (flash-attn)")
    if cu_seqlens is not None:
        if b != 1 or (len(shape) == 3 and shape[0] != 1):
            raise ValueError(f"cu_seqlens needs packed sequences in batch 1 and shared cos/sin; got batch {b}, cos {tuple(shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor of N+1 sequence starts, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if offsets is None or isinstance(offsets, int):
        return r
    if not isinstance(offsets, torch.Tensor):
        raise ValueError(f"offsets must be an int, a per-sequence int tensor or None, got {type(offsets).__name__}")
    n = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if offsets.shape != (n,) or offsets.dtype not in (torch.int32, torch.int64) or offsets.device != x0.device:
        raise ValueError(f"offsets tensor must be int32/int64 of shape ({n},) on {x0.device}, got {offsets.dtype} {tuple(offsets.shape)} on {offsets.device}")
    return r


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, fn, kw):
        oq, ok = fn(q, k, cos, sin, **kw)
        ctx.fn, ctx.kw = fn, kw
        ctx.save_for_backward(cos, sin)
        if kw["inplace"]:
            ctx.mark_dirty(*(x for x in (q, k) if x is not None))
        return oq, ok

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        kw = dict(ctx.kw, conjugate=not ctx.kw["conjugate"], inplace=False)
        gq = None if gq is None else _last_contiguous(gq)
        gk = None if gk is None else _last_contiguous(gk)
        dq, dk = (None, None) if gq is None and gk is None else ctx.fn(gq, gk, cos, sin, **kw)
        return dq, dk, None, None, None, None


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_op(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str = "torch",
    interleaved: bool = False,
    offsets: int | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    inplace: bool = False,
    layout: str = "bhtd",
    rotary_dim: int | None = None,
    conjugate: bool = False,
    rounding: str = "once",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotate q and k with ``backend``'s op, checked and differentiable; see ``rope_ext.rotary.apply_rotary``."""
    r = check_args(q, k, cos, sin, rotary_dim, offsets, cu_seqlens, layout, rounding)
    fn = _OPS.get(backend) or op(backend)
    if (q is not None and q.stride(-1) != 1) or (k is not None and k.stride(-1) != 1):
        if inplace:
            raise ValueError("inplace=True needs q and k with a contiguous last dim")
        q = None if q is None else _last_contiguous(q)
        k = None if k is None else _last_contiguous(k)
    if backend in ROUNDS_ONCE and rounding != "once":
        raise ValueError(f"the {backend} rotary rounds once (float32 arithmetic); rounding={rounding!r} needs kernel='torch'")
    if backend == "triton":
        if (q if q is not None else k).dtype not in TRITON_DTYPES:
            raise ValueError(f"the Triton rotary takes {TRITON_DTYPES}, got {(q if q is not None else k).dtype}; use kernel='torch'")
        stride = cos.stride()
        if stride[-1] != 1 or stride != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    seq_first = layout == "bthd"
    if torch.is_grad_enabled() and ((q is not None and q.requires_grad) or (k is not None and k.requires_grad)):
        kw = dict(rotary_dim=r, interleaved=interleaved, offsets=offsets, cu_seqlens=cu_seqlens, conjugate=conjugate,
                  inplace=inplace, seq_first=seq_first, rounding=rounding)
        return RotaryFunction.apply(q, k, cos, sin, fn, kw)
    return fn(q, k, cos, sin, rotary_dim=r, interleaved=interleaved, offsets=offsets, cu_seqlens=cu_seqlens,
              conjugate=conjugate, inplace=inplace, seq_first=seq_first, rounding=rounding)
