"""Log-n query scaling, an option of every method (``logn=True``)."""
from __future__ import annotations

import math

import torch


def logn_scale(positions: torch.Tensor, trained_length: int) -> torch.Tensor:
    """Log-n attention scaling (Su 2023; Chiang & Cholak 2022): q_i *= max(1, log(i+1) / log(L_train)).

    Keeps the entropy of attention roughly constant when the context grows past the trained length;
    identity for positions inside it.
    """
    n = positions.to(torch.float32) + 1.0
    return torch.clamp(torch.log(n) / math.log(trained_length), min=1.0)
