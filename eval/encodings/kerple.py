"""KERPLE (Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation"; chijames/KERPLE ``megatron/mpu/layers.py``): no rotation; a conditionally
positive definite kernel of the distance, learned per head, is added to the attention logits:

    logarithmic: b_h(i, j) = -r1_h * log(1 + r2_h |i - j|)          ("kerple_log")
    power:       b_h(i, j) = -r1_h * |i - j|^r2_h,  0 < r2_h <= 2   ("kerple_power")

r1, r2 > 0 as the paper's reference code keeps them: projected onto [eps, inf) ([eps, 2] for the
power's exponent) at the start of every forward pass (projected gradient descent), initialised
uniform on (0, 2) for the scale of the log kernel / the power's exponent and on (0, 1) for the other.
Power with r2 = 1 is ALiBi's linear bias with learned slopes r1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rope_ext.validate import number

from . import register
from .base import AttentionCall, Encoding, attach, remove_rotation, softmax_attention, use_attention

POWER_MAX = 2.0  # the power kernel is conditionally positive definite for 0 < r2 <= 2 (Chi et al. 2022)


def kerple_log_bias(r1: torch.Tensor, r2: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """-r1_h log(1 + r2_h |i - j|) (B, H, Lq, Lk) for per-head r1, r2 (H,) and distances (B, Lq, Lk)."""
    return -r1[None, :, None, None] * torch.log1p(r2[None, :, None, None] * distance[:, None])


def kerple_power_bias(r1: torch.Tensor, r2: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """-r1_h |i - j|^r2_h (B, H, Lq, Lk) for per-head r1, r2 (H,) and distances (B, Lq, Lk)."""
    return -r1[None, :, None, None] * distance[:, None].pow(r2[None, :, None, None])


class KerpleBias(torch.nn.Module):
    """One layer's learned kernel parameters r1, r2 (H,) and the attention that adds the bias."""

    def __init__(self, kind: str, heads: int, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        scale_r1, scale_r2 = (2.0, 1.0) if kind == "log" else (1.0, 2.0)
        self.r1 = torch.nn.Parameter(torch.rand(heads) * scale_r1)
        self.r2 = torch.nn.Parameter(torch.rand(heads) * scale_r2)

    def project(self) -> None:
        """r1, r2 onto their domain (the reference code's clamp of ``.data`` before each use); written
        only when one is outside it, so a graph still holding them stays valid otherwise."""
        high = POWER_MAX if self.kind == "power" else None
        with torch.no_grad():
            if (self.r1 < self.eps).any():
                self.r1.clamp_(min=self.eps)
            if (self.r2 < self.eps).any() or (high is not None and (self.r2 > high).any()):
                self.r2.clamp_(min=self.eps, max=high)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        self.project()
        distance = (call.q_pos[:, :, None] - call.k_pos[:, None, :]).abs().to(torch.float32)
        formula = kerple_log_bias if self.kind == "log" else kerple_power_bias
        return softmax_attention(query, key, value, call, formula(self.r1.float(), self.r2.float(), distance))


@dataclass(frozen=True, kw_only=True)
class _Kerple(Encoding):
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = "Chi et al. 2022, KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation"
    rope_based: ClassVar[bool] = False
    eps: float = 0.01

    def __post_init__(self) -> None:
        number(self.eps, f"{self.name}: eps", above=0, at_most=1)

    def install(self, model: torch.nn.Module) -> None:
        heads = model.config.num_attention_heads
        device = model.model.embed_tokens.weight.device
        attach(model, lambda _: KerpleBias(self.kind, heads, float(self.eps)).to(device))
        remove_rotation(model)
        use_attention(model, self.name)


@register("kerple_log")
@dataclass(frozen=True, kw_only=True)
class KerpleLog(_Kerple):
    """KERPLE's logarithmic kernel -r1 log(1 + r2 |i - j|) (the paper's best)."""

    kind: ClassVar[str] = "log"


@register("kerple_power")
@dataclass(frozen=True, kw_only=True)
class KerplePower(_Kerple):
    """KERPLE's power kernel -r1 |i - j|^r2, 0 < r2 <= 2."""

    kind: ClassVar[str] = "power"
