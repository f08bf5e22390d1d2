"""LongNet's dilated attention as a training-only pattern beside S2-Attn (Ding et al. 2023, "LongNet:
Scaling Transformers to 1,000,000,000 Tokens", sec. 2.2-2.4; issue 14).

In training mode every attention layer attends with the pairs (segment w_i, dilation r_i) through the
registered ``dilated`` method's own ``attend`` -- the same SDPA-per-pair forward and its memory-saving
backward, not a second copy of the algorithm -- over q and k already rotated by the fine-tune's
frequency method at their true positions (so the context it gets rotates nothing). In eval mode the
model attends over the whole sequence, unchanged (the ``train_attention`` seam of ``rope_ext.patch``),
so the merged model runs full attention at test time unless it is saved with the ``dilated`` method
(``FinetuneConfig.test_attention``).

Training batches are packed and unpadded (the seam refuses a padding mask), so the positions of a
call are 0 .. L-1: the condition of the fast path. Head h keeps the rows p = h (mod r_i) of the
tensor's heads, so a process that holds only some heads (sequence parallelism) would pick other
rows than one holding all of them: the fine-tune refuses the pair (``FinetuneConfig``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rope_ext.methods import AttentionContext, Method, registry

from .s2attn import Causal


def dilated_method(segments: Sequence[int], dilations: Sequence[int]) -> Method:
    """The registered ``dilated`` method with these pairs, validated by it (its messages: ascending,
    first dilation 1, each segment a multiple of its dilation, ...); a wrong type is a ValueError here."""
    try:
        return registry.get("dilated")(segments=tuple(segments), dilations=tuple(dilations))
    except TypeError as err:
        raise ValueError(str(err)) from None


def checked_pairs(segments: Sequence[int], dilations: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(segments, dilations) as tuples of ints, checked by the ``dilated`` method (``dilated_method``)."""
    method = dilated_method(segments, dilations)
    return method.segments, method.dilations


def _rotated(x: torch.Tensor, positions: torch.Tensor, tag: str | None = None) -> torch.Tensor:
    """q and k reach a training pattern rotated already: the context's rotation is the identity."""
    return x


def _no_frequencies() -> tuple[torch.Tensor, float]:
    raise RuntimeError("a training pattern's q and k are rotated by the fine-tune's method; dilated attention asked "
                       "for frequencies")


@dataclass(frozen=True)
class DilatedPattern:
    """The training-only attention pattern for ``rope_ext.patch(model, method, train_attention=...)``.

    ``segments`` / ``dilations``: LongNet's pairs (w_i, r_i); ``scaling``: the softmax scale of the
    model's attention, the one its ``causal`` uses (its modules' ``scaling``; ``dilated_pattern_for``
    reads it), None for 1 / sqrt(head dim).
    """

    segments: tuple[int, ...]
    dilations: tuple[int, ...]
    scaling: float | None = None
    _method: Method = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        method = dilated_method(self.segments, self.dilations)
        object.__setattr__(self, "segments", method.segments)
        object.__setattr__(self, "dilations", method.dilations)
        object.__setattr__(self, "_method", method)
        scale = self.scaling
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf")):
            raise ValueError(f"DilatedPattern: scaling must be a positive finite number or None, got {scale!r}")

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: Causal) -> torch.Tensor:
        """query (B, H, L, d) and key (B, Hkv, L, d) rotated at positions 0 .. L-1, value (B, Hkv, L, dv)
        -> (B, L, H, dv). ``causal`` (the model's plain causal attention) serves where one dense
        segment covers the sequence; otherwise each pair's compressed segments go through SDPA with
        their log-sum-exp."""
        length = query.shape[2]
        positions = torch.arange(length, device=query.device).expand(query.shape[0], length)
        scaling = query.shape[-1] ** -0.5 if self.scaling is None else float(self.scaling)

        def base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object = None) -> torch.Tensor:
            return causal(q, k, v)

        # spec: the RoPE facts a method rotates with; nothing is rotated here (``_rotated``)
        ctx = AttentionContext(spec=None, q_pos=positions, k_pos=positions, mask=None, scaling=scaling, softcap=None,
                               rotate=_rotated, base=base, causal=causal, frequencies=_no_frequencies)
        return self._method.attend(query, key, value, ctx)


def dilated_pattern_for(model: nn.Module, segments: Sequence[int], dilations: Sequence[int]) -> DilatedPattern:
    """The pattern with ``model``'s softmax scale, read from its attention modules (one value for all
    of them; None, i.e. 1 / sqrt(head dim), where they keep none); a family that soft-caps its attention logits (Gemma 2) is refused: the fast path has
    no softcap."""
    from rope_ext.patches import family_for

    modules = family_for(model).attention_modules(model)
    capped = [m for m in modules if getattr(m, "attn_logit_softcapping", None) is not None]
    if capped:
        raise ValueError(f"train_attention dilated: {type(capped[0]).__name__} soft-caps its attention logits, which the "
                         "dilated training path does not; use train_attention s2 or full")
    scales = {float(m.scaling) for m in modules if getattr(m, "scaling", None) is not None}
    if len(scales) > 1:
        raise ValueError(f"train_attention dilated: the attention layers of {type(model).__name__} do not share one "
                         f"softmax scale (found {sorted(scales)}); use train_attention s2 or full")
    return DilatedPattern(segments=tuple(segments), dilations=tuple(dilations), scaling=scales.pop() if scales else None)
