"""The rotary dispatcher users call: ``apply_rotary`` picks a backend for the device and hands q and
k to ``rope_ext.kernels.rotary_autograd`` (checks + autograd), which runs that backend's op: torch
(eager, any device), compiled (inductor, one graph per shape; "auto" on the CPU once a shape
recurs) or Triton (CUDA).

Layout "half" (HF / GPT-NeoX): the rotated pairs are (x_i, x_{i + r/2}); only the first r = 2 *
len(theta) dims rotate (partial rotary), the rest pass through. RoFormer eq. 34:
    x' = x * cos(m theta) + rotate_half(x) * sin(m theta).
``rotate`` is the same torch op rounded as transformers rounds (bitwise its rotation); ``cos_sin``
makes the tables as transformers' rotary modules do.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .kernels.rotary_autograd import AUTO_CPU, BACKENDS, apply_op
from .kernels.rotary_ops_torch import rotate_hf


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, L, r) for positions (B, L), computed in float32 exactly as transformers'
    rotary modules do, scaled by the method's attention scaling (YaRN's mscale)."""
    freqs = positions[..., None].to(torch.float32) * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, d) by cos/sin (B, L, r) as ``cos_sin`` makes them, r <= d; dims past r pass through.

    Bitwise what transformers computes, x * cos + rotate_half(x) * sin in x's dtype (the same
    products and sums, each rounded once): the torch op's ``rounding="each"`` arithmetic in its
    HF-table form (``rotary_ops_torch.rotate_hf``: no argument layers, which decoding pays per
    call), differentiable."""
    return rotate_hf(x, cos, sin)


KERNELS = ("auto", *BACKENDS)


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """The backend ``kernel`` names for tensors on ``device``: "auto" is Triton on CUDA (when
    triton is installed) and torch elsewhere (``apply_rotary`` then sends recurring CPU shapes to
    the compiled op, see ``auto_backend``); "triton" off CUDA needs ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if kernel == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if kernel == "triton":
        if not _triton_available():
            raise ValueError("kernel='triton' needs the triton package (pip install rope-ext[kernels])")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernel='triton' needs CUDA tensors (got {device}); use kernel='auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton")
        return "triton"
    if kernel in ("torch", "compiled"):
        return kernel
    raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def auto_backend(x: torch.Tensor, rounding: str, inplace: bool) -> str:
    """What "auto" runs for x: Triton on CUDA; on the CPU the compiled op (``AUTO_CPU``: a shape
    compiles at its third call, the torch op before and if compiling fails) for float32 / bfloat16 /
    float16, rounding "once", out of place; the torch op otherwise (float64, transformers' rounding
    "each", in place: the torch op works in place, the compiled one would add a copy). Inside a
    region torch.compile is tracing, the CPU takes "compiled", whose expression is traced into
    that graph."""
    name = resolve_kernel("auto", x.device)
    if rounding == "each" or x.dtype == torch.float64:
        return "torch"
    if name == "torch" and x.device.type == "cpu":
        if torch.compiler.is_compiling():
            return "compiled"
        if x.dtype in AUTO_DTYPES and not inplace:
            return AUTO_CPU
    return name


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def apply_rotary(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    kernel: str = "auto",
    interleaved: bool = False,
    offsets: int | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    inplace: bool = False,
    layout: str = "bhtd",
    rotary_dim: int | None = None,
    rounding: str = "once",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotate q (B, Hq, T, d) and k (B, Hk, T, d) in one call; Hq and Hk may differ (GQA / MQA).

    cos/sin: (B, Tc, w), (1, Tc, w) or (Tc, w). HF tables have w = r (halves repeated, as
    ``cos_sin`` makes them); flash-attn tables have w = r / 2 (pass ``rotary_dim=r``). Only the
    first r dims of each head rotate (partial rotary), the rest pass through.
    ``interleaved``: GPT-J pairs (x_2i, x_2i+1) instead of HF / NeoX halves (x_i, x_i+r/2).
    ``offsets``: int or per-sequence int tensor; token t is rotated to table row t + offset (decoding
    with a KV cache). ``cu_seqlens``: (N+1,) starts of N packed sequences in batch 1; positions restart
    at each start. Rows outside the table are left unrotated. ``layout="bthd"`` takes (B, T, H, d).
    ``inplace``: overwrite q and k. ``kernel``: "auto" (``auto_backend``: Triton on CUDA, on the CPU
    the compiled op for shapes that recur, else torch), "triton", "torch", "compiled" (inductor,
    one graph per shape: ``rope_ext.kernels.rotary_ops_compiled``); all give the same numbers
    (float32 arithmetic, one rounding). ``rounding="each"`` (torch only; "auto" picks it) rounds
    every product and sum to the input dtype instead, as transformers does (``rotate``).
    Differentiable in q, k.
    Returns (q', k'); either input may be None and is returned as None.
    """
    x = q if q is not None else k
    if x is None:
        raise ValueError("q and k are both None: nothing to rotate")
    name = auto_backend(x, rounding, inplace) if kernel == "auto" else resolve_kernel(kernel, x.device)
    return apply_op(q, k, cos, sin, backend=name, interleaved=interleaved, offsets=offsets, cu_seqlens=cu_seqlens,
                    inplace=inplace, layout=layout, rotary_dim=rotary_dim, rounding=rounding)
