"""Applying rotary position embeddings: the plain torch reference used on every device.

Layout "half" (HF / GPT-NeoX): the rotated pairs are (x_i, x_{i + r/2}); only the first r = 2 *
len(theta) dims rotate (partial rotary), the rest pass through. RoFormer eq. 34:
    x' = x * cos(m theta) + rotate_half(x) * sin(m theta).
``apply_rotary`` is the fused path: q and k in one call, Triton on CUDA (rope_ext/kernels).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .kernels.rotary_apply import rotary


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


FEW_CALLS = 1 << 16  # elements below which ``rotate`` takes transformers' own expression (fewest calls)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, d) by cos/sin (B, L, r), r <= d; dims past r are passed through.

    Bitwise what transformers computes, x * cos + rotate_half(x) * sin in x's dtype (the same
    products and sums, each rounded once): small inputs take that expression; larger ones write
    x * cos once and subtract / add the half products in place, which moves far fewer bytes
    (rotate_half's negated copy and concatenation are never made)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if x.numel() < FEW_CALLS:
        if r == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
    half = r // 2
    out = torch.empty_like(x)
    x_rot, out_rot = (x, out) if r == x.shape[-1] else (x[..., :r], out[..., :r])
    torch.mul(x_rot, cos, out=out_rot)
    out_rot[..., :half].sub_(x_rot[..., half:] * sin[..., :half])
    out_rot[..., half:].add_(x_rot[..., :half] * sin[..., half:])
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


KERNELS = ("auto", "triton", "torch")


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """The backend ``kernel`` names for tensors on ``device``: "auto" is Triton on CUDA (when
    triton is installed) and torch elsewhere; "triton" off CUDA needs ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if kernel == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if kernel == "triton":
        if not _triton_available():
            raise ValueError("kernel='triton' needs the triton package (pip install rope-ext[kernels])")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernel='triton' needs CUDA tensors (got {device}); use kernel='auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton")
        return "triton"
    if kernel == "torch":
        return "torch"
    raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotate q (B, Hq, T, d) and k (B, Hk, T, d) in one call; Hq and Hk may differ (GQA / MQA).

    cos/sin: (B, Tc, w), (1, Tc, w) or (Tc, w). HF tables have w = r (halves repeated, as
    ``cos_sin`` makes them); flash-attn tables have w = r / 2 (pass ``rotary_dim=r``). Only the
    first r dims of each head rotate (partial rotary), the rest pass through.
    ``interleaved``: GPT-J pairs (x_2i, x_2i+1) instead of HF / NeoX halves (x_i, x_i+r/2).
    ``offsets``: int or per-sequence int tensor; token t is rotated to table row t + offset (decoding
    with a KV cache). ``cu_seqlens``: (N+1,) starts of N packed sequences in batch 1; positions restart
    at each start. Rows outside the table are left unrotated. ``layout="bthd"`` takes (B, T, H, d).
    ``inplace``: overwrite q and k. ``kernel``: "auto" (Triton on CUDA, torch elsewhere), "triton",
    "torch"; all give the same numbers (float32 arithmetic, one rounding). Differentiable in q, k.
    Returns (q', k'); either input may be None and is returned as None.
    """
    x = q if q is not None else k
    if x is None:
        raise ValueError("q and k are both None: nothing to rotate")
    name = resolve_kernel(kernel, x.device)
    if kernel == "auto" and x.dtype == torch.float64:
        name = "torch"
    return rotary(q, k, cos, sin, backend_name=name, interleaved=interleaved, offsets=offsets,
                  cu_seqlens=cu_seqlens, inplace=inplace, layout=layout, rotary_dim=rotary_dim)
