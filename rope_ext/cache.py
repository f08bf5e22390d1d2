"""The cache-policy seam: a method's ``CachePolicy`` as transformers 5.x cache layers.

A patched model whose method has a cache policy gets, in every KV cache it runs with, one
``PolicyLayer`` per decoder layer (``install`` wraps this model's forward through the patch's
Recorder: a cache that forward or ``generate`` creates is built from them, and an empty cache the
caller passes gets them). A layer appends the new keys and values in ``update`` as the dynamic
cache does; the attention glue then asks it, for this call, where every entry is attended and which
entries are padding (``attend_view``), and after the attention it drops what the policy does not
keep (``evict``). ``get_seq_length`` counts every token seen, so positions keep counting past
evictions; ``get_mask_sizes`` gives the model's mask the shape of what the attention will see.
A layer also holds ``memory``, the method's per-layer state across calls (``ctx.memory``), reordered
with the batch; a method with ``uses_layer_memory`` and no policy gets the keep-all ``CachePolicy``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ._compat import cache_kwarg
from .methods.context import CachePolicy


class PolicyLayer(DynamicLayer):
    """One decoder layer's cache under a ``CachePolicy``: keys and values of the kept entries, with
    each entry's absolute position and validity (False for padding)."""

    def __init__(self, policy: CachePolicy) -> None:
        super().__init__()
        self.policy = policy
        self.seen = 0
        self.absolute: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.memory: dict[str, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append the new entries (their positions arrive with ``attend_view``) and return all."""
        self.seen += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def attend_view(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the new entries' absolute positions (B, Lq) and validity, and return the positions
        (B, Lk) every entry is attended at (the policy's) and their validity."""
        if self.absolute is None:
            self.absolute, self.valid = q_pos.clone(), q_valid.clone()
        elif self.absolute.shape[1] < self.keys.shape[-2]:
            self.absolute = torch.cat([self.absolute, q_pos], dim=1)
            self.valid = torch.cat([self.valid, q_valid], dim=1)
        return self.policy.positions(self.absolute, self.valid), self.valid

    def evict(self) -> None:
        """Keep only the entries the policy keeps (one gather per tensor)."""
        index = self.policy.keep(self.valid)
        if index is None:
            return
        rows = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, rows)
        self.values = self.values.gather(2, index[:, None, :, None].expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.absolute, self.valid = self.absolute.gather(1, index), self.valid.gather(1, index)

    def stored(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(entries the attention will see, offset): the kept entries sit just before the queries."""
        return self.stored() + query_length, self.seen - self.stored()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen, self.absolute, self.valid = 0, None, None
        self.memory.clear()

    def _rows(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch reordering to the positions, validity and memory (batch-first tensors)."""
        if self.absolute is not None:
            self.absolute, self.valid = select(self.absolute), select(self.valid)
        self.memory.update({name: select(t) for name, t in self.memory.items()})

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a rope_ext cache policy keeps a subset of the tokens; it cannot be cropped (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t[beam_idx.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])


def policy_cache(policy: CachePolicy, num_layers: int) -> DynamicCache:
    """A cache of ``num_layers`` PolicyLayers."""
    cache = DynamicCache()
    cache.layers = [PolicyLayer(policy) for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    return cache


def is_policy_cache(cache: Cache) -> bool:
    return bool(cache.layers) and all(isinstance(layer, PolicyLayer) for layer in cache.layers)


def install(rec: Any, model: nn.Module, policy: CachePolicy, note_cache: Callable[[Cache | None], None]) -> None:
    """Make every KV cache ``model`` runs with hold ``policy``'s layers, and tell ``note_cache``
    which cache the current forward uses (None without one). Written through the Recorder."""
    original = model.forward
    keyword = cache_kwarg(model)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        cache = kwargs.get(keyword)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = model.config.use_cache
        if use_cache and not model.training:
            if cache is None:
                cache = kwargs[keyword] = policy_cache(policy, num_layers)
            elif not is_policy_cache(cache):
                if not isinstance(cache, Cache) or cache.get_seq_length() > 0:
                    raise ValueError(
                        f"{type(policy).__name__} needs a transformers Cache that held its policy from the first "
                        f"token; got a {type(cache).__name__} that already holds tokens"
                    )
                cache.layers = [PolicyLayer(policy) for _ in range(num_layers)]
                cache.layer_class_to_replicate = None
        note_cache(cache if use_cache and not model.training else None)
        return original(*args, **kwargs)

    rec.setattr(model, "forward", forward)
