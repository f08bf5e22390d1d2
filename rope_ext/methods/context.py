"""What a method's ``attend`` receives, and what a cache policy decides: transformers-free protocols.

``rope_ext.attention`` (the glue to transformers) builds one ``AttentionContext`` per attention call
of a patched layer and calls ``method.attention(q, k, v, ctx)``. A method reads positions and the
mask here, rotates with ``ctx.rotate``, calls the model's own attention with ``ctx.base`` or any
kernel of ``rope_ext.kernels`` directly, and returns the output. Nothing here imports transformers.

A method that changes what the KV cache keeps returns a ``CachePolicy`` from ``cache_policy()``: it
says which cached entries stay (``keep``) and at which positions the kept keys and the new queries
are attended (``positions``). ``rope_ext.cache`` turns it into transformers cache layers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .spec import RopeSpec

MODEL_MASK = "model"


def key_positions(q_pos: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Positions of the keys (B, Lk) of the plain KV cache: the new keys are the queries themselves;
    cached ones are the contiguous run ending just before the first new query.

    Exact for any positions without a cache (right padding included) and for left-padded or
    unpadded decoding with KV and sliding-window caches. Not covered: packed sequences whose
    positions restart inside a row while decoding with a cache (a cache policy tracks positions
    per entry instead).
    """
    past = kv_length - q_pos.shape[1]
    if past == 0:
        return q_pos
    first = q_pos[:, :1]
    cached = torch.arange(past, device=q_pos.device)[None, :] + (first - past)
    return torch.cat([cached, q_pos], dim=1)


def valid_queries(mask: torch.Tensor | None, q_len: int, batch: int) -> torch.Tensor:
    """(B, Lq) True where a new token is real, from the model's mask (additive float or bool,
    (B|1, H|1, Lq, Lk), the queries the last Lq keys; None: no padding): a real token may attend itself."""
    if mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool)
    diag = torch.diagonal(mask[:, 0, :, mask.shape[-1] - q_len:], dim1=-2, dim2=-1)
    allowed = diag if mask.dtype == torch.bool else diag > torch.finfo(mask.dtype).min / 2
    return allowed.expand(batch, q_len)


@dataclass
class AttentionContext:
    """One attention call of one layer: q/k/v are (B, H, L, d) with the KV heads not repeated.

    ``q_pos`` (B, Lq) and ``k_pos`` (B, Lk) are the positions the method attends at (the cache
    policy's, when one re-positions); ``mask`` is the model's mask (additive float or bool,
    broadcastable to (B, H, Lq, Lk), None for plain causal); ``rotate(x, positions, tag)`` rotates
    with the method's frequencies (tables shared by every layer of one forward pass under one
    ``tag``); ``base(q, k, v, mask=MODEL_MASK)`` is the model's own attention implementation,
    returning (B, Lq, H, d); ``causal(q, k, v)`` is that implementation with a plain causal mask over
    equal-length q and k (for training-time patterns such as S2-Attn); ``frequencies()`` gives the
    method's (theta_i, cos/sin magnitude) at this call's length. ``memory`` is this layer's scratch
    in the KV cache the call runs with, kept across its calls (for a method with ``uses_layer_memory``;
    None without a cache): what a method stores there must be batch-first tensors."""

    spec: RopeSpec
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    rotate: Callable[[torch.Tensor, torch.Tensor, str | None], torch.Tensor]
    base: Callable[..., torch.Tensor]
    causal: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    frequencies: Callable[[], tuple[torch.Tensor, float]]
    two_part_impl: str = "merged"
    memory: dict[str, torch.Tensor] | None = None

    @property
    def seq_len(self) -> int:
        """Current length for dynamic methods: max position + 1 over the batch (as transformers)."""
        return int(self.q_pos.max()) + 1

    def allowed(self) -> torch.Tensor:
        """Boolean (B|1, 1|H, Lq, Lk) mask, True where a query may attend a key (causal if none given)."""
        mask = self.mask
        if mask is None:
            return self.k_pos[:, None, None, :] <= self.q_pos[:, None, :, None]
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2

    def query_valid(self) -> torch.Tensor:
        """(B, Lq) True where a query is a real token, False for padding."""
        return valid_queries(self.mask, self.q_pos.shape[1], self.q_pos.shape[0]).to(self.q_pos.device)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive float mask (0 where allowed, the dtype's minimum elsewhere)."""
        zero = torch.zeros((), dtype=dtype, device=self.q_pos.device)
        return zero.masked_fill(~self.allowed(), torch.finfo(dtype).min)


class CachePolicy:
    """What a KV cache keeps, and where kept keys sit. Subclass and override ``keep`` (and
    ``positions`` to re-position); one class is one policy (see tests/test_cache_policy.py).

    Entries are the tokens a layer has cached, in arrival order; ``valid`` (B, N) is False for
    padding. Defaults keep everything at its absolute position: the plain KV cache."""

    def keep(self, valid: torch.Tensor) -> torch.Tensor | None:
        """Indices (B, K), ascending per row, of the entries to keep after this step; None keeps all."""
        return None

    def positions(self, absolute: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Positions (B, N) at which the entries are attended (the last Lq are the new queries')."""
        return absolute

    @property
    def keeps_all(self) -> bool:
        """True when ``keep`` is the plain cache's (every entry stays)."""
        return type(self).keep is CachePolicy.keep

    @property
    def repositions(self) -> bool:
        """True when ``positions`` differs from the absolute ones: keys must then be cached
        unrotated and rotated at attention time (the patch arranges it)."""
        return type(self).positions is not CachePolicy.positions
