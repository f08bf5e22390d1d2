"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer", sec. 3.2; torchscale's
``xpos_relative_position.py``): RoPE whose rotation pairs decay with the relative distance.

Pair i of a head (the pair RoPE rotates at theta_i) carries zeta_i = (2i/d + gamma) / (1 + gamma);
the query at position n is scaled by zeta^(n/B), the key at m by zeta^(-m/B) (B the scale base), so
the score of pair i is multiplied by zeta_i^((n - m)/B) <= 1: it decays with n - m. A per-pair scale
commutes with the pair's rotation, so the scales are applied to the projections (q_proj, k_proj
outputs) and the model's own rotary module rotates as usual: any rope_ext method (a frequency
method or ReRoPE-style attention) applies to the rotation at inference, and the KV cache holds the
scaled keys. The scales are computed in float32 from exp((n / B) log zeta) at absolute positions;
a position whose factor would leave half the dtype's exponent range (float32: about 44 B / ln(1 /
zeta_0) = 18k positions at B = 512, gamma = 0.4) is refused. zeta = 1 (gamma -> inf) is RoPE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rope_ext.validate import MAX_COUNT, number

from . import register
from .base import Encoding, attach, attention_layers


def xpos_zeta(head_dim: int, gamma: float) -> torch.Tensor:
    """zeta_i = (2i/d + gamma) / (1 + gamma) for the d/2 rotation pairs (Sun et al. 2022, sec. 3.2)."""
    return (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim + gamma) / (1 + gamma)


def xpos_scale(positions: torch.Tensor, zeta: torch.Tensor, scale_base: float) -> torch.Tensor:
    """zeta^(n / B) (..., L, d/2) in float32 for positions n (..., L): the query scale; its inverse
    (``positions`` negated) is the key scale."""
    return torch.exp(positions.to(torch.float32)[..., None] / scale_base * torch.log(zeta))


def max_position(zeta: torch.Tensor, scale_base: float, dtype: torch.dtype) -> int:
    """The largest position whose scales stay within half of ``dtype``'s exponent range (any
    position when zeta = 1: no decay)."""
    decay = -math.log(float(zeta.min()))
    return MAX_COUNT if decay <= 0 else int(0.5 * math.log(torch.finfo(dtype).max) * scale_base / decay)


class XPosScale(torch.nn.Module):
    """The per-layer xPos state: zeta (a non-persistent buffer: the checkpoint stays a Llama one)
    and the positions of the current call, noted by a pre-hook on the attention module."""

    def __init__(self, head_dim: int, gamma: float, scale_base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.scale_base = scale_base
        self.register_buffer("zeta", xpos_zeta(head_dim, gamma), persistent=False)
        self.positions: torch.Tensor | None = None

    def note(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        positions = kwargs.get("position_ids")
        if positions is None:
            raise ValueError("xpos: the attention module was called without position_ids (needed for the decay)")
        self.positions = positions

    def scaled(self, output: torch.Tensor, sign: float) -> torch.Tensor:
        """The projection ``output`` (B, L, heads * d) with each head's pairs scaled by zeta^(sign n / B)."""
        positions = self.positions
        limit = max_position(self.zeta, self.scale_base, output.dtype)
        top = int(positions.max())
        if top > limit:
            raise ValueError(f"xpos: position {top} is past {limit}, the largest whose decay factors stay finite in "
                             f"{output.dtype} with scale_base={self.scale_base:g}; use a larger scale_base")
        half = xpos_scale(sign * positions.to(output.device), self.zeta, self.scale_base)
        factor = torch.cat([half, half], dim=-1).to(output.dtype)  # Llama's rotate_half layout: pair i = (i, i + d/2)
        shape = output.shape
        return (output.view(*shape[:-1], -1, self.head_dim) * factor[..., None, :]).view(shape)


@register("xpos")
@dataclass(frozen=True, kw_only=True)
class XPos(Encoding):
    """xPos: RoPE with the per-pair decay zeta^((n - m) / B) of the scores."""

    paper: ClassVar[str] = "Sun et al. 2022, A Length-Extrapolatable Transformer (xPos)"
    rope_based: ClassVar[bool] = True
    gamma: float = 0.4
    scale_base: float = 512.0

    def __post_init__(self) -> None:
        number(self.gamma, "xpos: gamma", above=0, at_most=MAX_COUNT)
        number(self.scale_base, "xpos: scale_base", above=0, at_most=MAX_COUNT)

    def install(self, model: torch.nn.Module) -> None:
        layers = attention_layers(model)
        attach(model, lambda i: XPosScale(layers[i].head_dim, float(self.gamma), float(self.scale_base)))
        for attn in layers:
            scale = attn.lab_pe
            attn.register_forward_pre_hook(scale.note, with_kwargs=True)
            attn.q_proj.register_forward_hook(lambda _m, _a, out, s=scale: s.scaled(out, 1.0))
            attn.k_proj.register_forward_hook(lambda _m, _a, out, s=scale: s.scaled(out, -1.0))
