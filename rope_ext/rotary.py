"""Applying rotary position embeddings: the plain torch reference used on every device.

Layout "half" (HF / GPT-NeoX): the rotated pairs are (x_i, x_{i + r/2}); only the first r = 2 *
len(theta) dims rotate (partial rotary), the rest pass through. RoFormer eq. 34:
    x' = x * cos(m theta) + rotate_half(x) * sin(m theta).
"""
from __future__ import annotations

import torch


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
    """Rotate x (B, H, L, d) by cos/sin (B, L, r), r <= d; dims past r are passed through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
