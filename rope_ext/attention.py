"""Glue between transformers and a method's attention: the function rope_ext registers, and the
``AttentionContext`` it builds for each call. Nothing here knows a formula.

For a base implementation X (``eager``, ``sdpa``, ``flash_attention_2`` ...) we register
``rope_ext_X`` with ``AttentionInterface`` and X's own mask function under the same name with
``AttentionMaskInterface`` (without it padding would be silently dropped). A patched model's config
selects ``rope_ext_X``; every other model in the process is untouched. The function finds the
model's ``Runtime`` on the attention module, builds the context (positions -- the cache policy's
when the method has one --, mask, rotation tables, the base implementation) and returns

    method.attention(q, k, v, ctx)            # or method.train_attention(pattern, ...) in training
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import PolicyLayer
from .methods.base import Method
from .methods.context import MODEL_MASK, AttentionContext, key_positions, valid_queries
from .methods.spec import RopeSpec
from .rotary import apply_rotary, cos_sin, rotate

PREFIX = "rope_ext_"


@dataclass
class ForwardState:
    """What the current forward pass has seen: the new tokens' positions (from the rotary module),
    the KV cache it runs with, and the cos/sin tables shared by its layers."""

    position_ids: torch.Tensor | None = None
    cache: Any = None
    tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Runtime:
    """Per-model state the attention function needs; lives on each patched attention module."""

    method: Method
    specs: dict[str | None, RopeSpec]
    train_attention: Any = None
    rotary_kernel: str = "torch"
    two_part_impl: str = "merged"
    state: ForwardState = field(default_factory=ForwardState)

    def new_forward(self, position_ids: torch.Tensor) -> None:
        self.state = ForwardState(position_ids=position_ids, cache=self.state.cache)

    def note_cache(self, cache: Any) -> None:
        self.state.cache = cache

    def policy_layer(self, layer_idx: int) -> PolicyLayer | None:
        layers = getattr(self.state.cache, "layers", None)
        if layers and isinstance(layers[layer_idx], PolicyLayer):
            return layers[layer_idx]
        return None


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    """The implementation the unpatched model would call; "eager" is each family's own function
    (Gemma 2's applies the logit softcap), found in the attention module's modeling file."""
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _policy_view(layer: PolicyLayer, q_pos: torch.Tensor, mask: torch.Tensor | None, q_len: int, kv_len: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_pos, k_pos, additive mask) of a call under a cache policy: the policy's positions; keys
    visible when they are real and arrived no later than the query."""
    valid_q = valid_queries(mask, q_len, q_pos.shape[0]).to(q_pos.device)
    k_pos, valid = layer.attend_view(q_pos, valid_q)
    order = torch.arange(kv_len, device=q_pos.device)
    arrived = order[None, :] <= order[kv_len - q_len:, None]
    allowed = (valid[:, None, None, :] & arrived[None, None]).to(q_pos.device)
    additive = torch.zeros((), dtype=dtype, device=q_pos.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return k_pos[:, kv_len - q_len:], k_pos, additive


def _causal_mask(base_name: str, kwargs: dict[str, Any], query: torch.Tensor) -> torch.Tensor | None:
    """A plain causal mask over equal-length q and k keeping the layer's sliding window (Mistral,
    Gemma 2/3 local layers) when it is shorter; None when the base implementation's own causal
    path does it."""
    L = query.shape[2]
    window = kwargs.get("sliding_window")
    if base_name != "eager" and (window is None or window >= L):
        return None
    i = torch.arange(L, device=query.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    return torch.zeros(L, L, dtype=query.dtype, device=query.device).masked_fill(~allowed, torch.finfo(query.dtype).min)


def _has_padding(ctx: AttentionContext, sliding_window: int | None) -> bool:
    """True when the model's mask hides more than the causal future and the layer's sliding window
    (padding, packing)."""
    if ctx.mask is None:
        return False
    rel = ctx.q_pos[:, None, :, None] - ctx.k_pos[:, None, None, :]
    causal = rel >= 0
    if sliding_window is not None:
        causal = causal & (rel < sliding_window)
    return not torch.equal(*torch.broadcast_tensors(ctx.allowed(), causal))


def _context(module: torch.nn.Module, runtime: Runtime, base_name: str, query: torch.Tensor, key: torch.Tensor,
             mask: torch.Tensor | None, dropout: float, scaling: float, kwargs: dict[str, Any]) -> AttentionContext:
    q_len, kv_len = query.shape[2], key.shape[2]
    pos = runtime.state.position_ids
    if pos is None or pos.shape[-1] != q_len:
        pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[None, :]
    q_pos = pos.to(query.device).expand(query.shape[0], -1)
    layer = runtime.policy_layer(module.layer_idx) if hasattr(module, "layer_idx") else None
    if layer is not None and (layer.policy.repositions or not layer.policy.keeps_all):
        q_pos, k_pos, mask = _policy_view(layer, q_pos, mask, q_len, kv_len, query.dtype)
    else:
        k_pos = key_positions(q_pos, kv_len)
    layer_type = getattr(module, "rope_ext_layer_type", None)
    spec = runtime.specs.get(layer_type) or next(iter(runtime.specs.values()))
    method = runtime.method
    fn = _base_function(base_name, module)
    seq_len = int(q_pos.max()) + 1
    rest = {k: v for k, v in kwargs.items() if k != "sliding_window"}

    def frequencies() -> tuple[torch.Tensor, float]:
        return method.frequencies(spec, seq_len if method.rotates == "deferred" else None)

    def rotate_to(x: torch.Tensor, positions: torch.Tensor, tag: str | None = None) -> torch.Tensor:
        """Rotate x (B, H, L, d) to ``positions`` (B, L); tables computed once per pass and tag."""
        tables = runtime.state.tables
        cache_key = (tag, spec, positions.shape, x.dtype, x.device)
        if tag is None or cache_key not in tables:
            inv_freq, magnitude = frequencies()
            tables[cache_key] = cos_sin(inv_freq.to(x.device), positions, magnitude, x.dtype)
        cos, sin = tables[cache_key]
        if runtime.rotary_kernel == "triton":
            return apply_rotary(x, None, cos, sin, kernel="triton")[0]
        return rotate(x, cos, sin)

    def base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any = MODEL_MASK) -> torch.Tensor:
        chosen = ctx.mask if isinstance(mask, str) else mask
        return fn(module, q, k, v, chosen, dropout=dropout, scaling=scaling, **kwargs)[0]

    def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(module, q, k, v, _causal_mask(base_name, kwargs, q), dropout=dropout, scaling=scaling, **rest)[0]

    ctx = AttentionContext(
        spec=spec, q_pos=q_pos, k_pos=k_pos, mask=mask, scaling=scaling, softcap=kwargs.get("softcap"),
        rotate=rotate_to, base=base, causal=causal, frequencies=frequencies, two_part_impl=runtime.two_part_impl,
        memory=None if layer is None else layer.memory,
    )
    return ctx


def make_attention_function(base_name: str) -> Callable:
    def rope_ext_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
        runtime: Runtime = module.rope_ext_runtime
        scaling = module.head_dim ** -0.5 if scaling is None else scaling
        ctx = _context(module, runtime, base_name, query, key, attention_mask, dropout, scaling, kwargs)
        method = runtime.method
        if runtime.train_attention is not None and module.training:
            if _has_padding(ctx, kwargs.get("sliding_window")):
                raise ValueError("train_attention (e.g. S2-Attn) needs unpadded, packed batches; got a padding mask")
            return method.train_attention(runtime.train_attention, query, key, value, ctx), None
        out = method.attention(query, key, value, ctx)
        layer = runtime.policy_layer(module.layer_idx) if hasattr(module, "layer_idx") else None
        if layer is not None:
            layer.evict()
        return out, None

    rope_ext_attention.__name__ = f"{PREFIX}{base_name}"
    return rope_ext_attention


def register(base_name: str) -> str:
    """Register ``rope_ext_<base>`` (attention + the base's mask function); returns the name."""
    if base_name.startswith(PREFIX):
        raise ValueError(f"attention implementation {base_name!r} is already rope_ext's")
    if base_name != "eager" and base_name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"unknown attention implementation {base_name!r}; known: eager, {', '.join(ALL_ATTENTION_FUNCTIONS.valid_keys())}")
    name = PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, make_attention_function(base_name))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name
