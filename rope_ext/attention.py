"""The one attention function rope_ext registers with transformers, and the context it hands methods.

For a base implementation X (``eager``, ``sdpa``, ``flash_attention_2`` ...) we register
``rope_ext_X`` with ``AttentionInterface`` and X's own mask function under the same name with
``AttentionMaskInterface`` (without it padding would be silently dropped). A patched model's config
selects ``rope_ext_X``; every other model in the process is untouched. The function finds the
model's ``Runtime`` on the attention module and asks the method for the output:

    method.attend(q, k, v, ctx)    # ctx: positions, rotation, the base implementation, masks

so an attention-level method (ReRoPE, ALiBi, Self-Extend, later sinks or sparse patterns) is one
``attend`` in ``rope_ext/methods`` and nothing here changes.
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

from .kernels.two_part_merged import two_part_attention_merged
from .methods.base import Method, RopeSpec
from .methods.logn import logn_scale
from .rotary import apply_rotary, cos_sin, rotate
from .two_part import two_part_attention

PREFIX = "rope_ext_"
TWO_PART_IMPLS: dict[str, Callable] = {"merged": two_part_attention_merged, "reference": two_part_attention}


@dataclass
class ForwardState:
    """What the rotary module saw in the current forward pass (positions of the new tokens)."""

    position_ids: torch.Tensor | None = None
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

    def two_part_fn(self) -> Callable:
        """Near/far attention: "merged" (two SDPA calls joined by log-sum-exp, no score matrix) or
        "reference" (query-blocked score matrices); both give the same outputs."""
        return TWO_PART_IMPLS[self.two_part_impl]

    def new_forward(self, position_ids: torch.Tensor) -> None:
        self.state = ForwardState(position_ids=position_ids)


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    """The implementation the unpatched model would call; "eager" is each family's own function
    (Gemma 2's applies the logit softcap), found in the attention module's modeling file."""
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


@dataclass
class AttentionContext:
    """Everything a method's ``attend`` may use; q/k/v are (B, H, L, d) with KV heads not repeated."""

    module: torch.nn.Module
    runtime: Runtime
    spec: RopeSpec
    base_name: str
    mask: torch.Tensor | None
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    scaling: float
    dropout: float
    kwargs: dict[str, Any]

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    @property
    def seq_len(self) -> int:
        """Current length for dynamic methods: max position + 1 over the batch (as transformers)."""
        return int(self.q_pos.max()) + 1

    def frequencies(self) -> tuple[torch.Tensor, float]:
        method = self.runtime.method
        return method.frequencies(self.spec, self.seq_len if method.rotation == "deferred" else None)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, tag: str | None = None) -> torch.Tensor:
        """Rotate x (B, H, L, d) to ``positions`` (B, L) with the method's frequencies. With a ``tag``
        ("q", "k", "q_far" ...) the cos/sin tables are computed once per forward pass and shared by
        every layer (positions with one tag must not change between layers of one pass)."""
        tables = self.runtime.state.tables
        key = (tag, self.spec, positions.shape, x.dtype, x.device)
        if tag is None or key not in tables:
            inv_freq, scaling = self.frequencies()
            tables[key] = cos_sin(inv_freq.to(x.device), positions, scaling, x.dtype)
        cos, sin = tables[key]
        if self.runtime.rotary_kernel == "triton":
            return apply_rotary(x, None, cos, sin, kernel="triton")[0]
        return rotate(x, cos, sin)

    def base(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any = "model") -> torch.Tensor:
        """The model's own attention implementation (B, Lq, H, d); ``mask`` defaults to the model's."""
        fn = _base_function(self.base_name, self.module)
        mask = self.mask if isinstance(mask, str) else mask
        out, _ = fn(self.module, query, key, value, mask, dropout=self.dropout, scaling=self.scaling, **self.kwargs)
        return out

    def causal(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The base implementation with a plain causal mask over equal-length q and k (for S2-Attn),
        keeping the layer's sliding window (Mistral, Gemma 2/3 local layers) when it is shorter."""
        L = query.shape[2]
        window = self.kwargs.get("sliding_window")
        mask = None
        if self.base_name == "eager" or (window is not None and window < L):
            i = torch.arange(L, device=query.device)
            allowed = i[None, :] <= i[:, None]
            if window is not None:
                allowed = allowed & (i[:, None] - i[None, :] < window)
            mask = torch.zeros(L, L, dtype=query.dtype, device=query.device).masked_fill(~allowed, torch.finfo(query.dtype).min)
        kwargs = {k: v for k, v in self.kwargs.items() if k != "sliding_window"}
        out, _ = _base_function(self.base_name, self.module)(self.module, query, key, value, mask, dropout=self.dropout, scaling=self.scaling, **kwargs)
        return out

    def two_part(self, q_near, k_near, q_far, k_far, value, window: int) -> torch.Tensor:
        """Near/far attention (ReRoPE family) with this call's positions, mask, scaling and softcap;
        the fused merged path when the runtime selects it, else the query-blocked reference."""
        allowed = None if self.mask is None else self.allowed()
        fn = self.runtime.two_part_fn()
        return fn(q_near, k_near, q_far, k_far, value, self.q_pos, self.k_pos, window, allowed, self.scaling, self.softcap)

    def allowed(self) -> torch.Tensor:
        """Boolean (B|1, 1|H, Lq, Lk) mask, True where a query may attend a key (causal if none given)."""
        mask = self.mask
        if mask is None:
            return (self.k_pos[:, None, None, :] <= self.q_pos[:, None, :, None])
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive float mask (0 where allowed, the dtype's minimum elsewhere)."""
        zero = torch.zeros((), dtype=dtype, device=self.q_pos.device)
        return zero.masked_fill(~self.allowed(), torch.finfo(dtype).min)


def key_positions(q_pos: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Positions of the keys (B, Lk): the new keys are the queries themselves; cached ones are the
    contiguous run ending just before the first new query.

    Exact for any positions without a cache (right padding included) and for left-padded or
    unpadded decoding with KV and sliding-window caches. Not covered: packed sequences whose
    positions restart inside a row while decoding with a cache.
    """
    past = kv_length - q_pos.shape[1]
    if past == 0:
        return q_pos
    first = q_pos[:, :1]
    cached = torch.arange(past, device=q_pos.device)[None, :] + (first - past)
    return torch.cat([cached, q_pos], dim=1)


def _has_padding(ctx: AttentionContext) -> bool:
    """True when the model's mask hides more than the causal future and the layer's sliding window
    (padding, packing)."""
    if ctx.mask is None:
        return False
    rel = ctx.q_pos[:, None, :, None] - ctx.k_pos[:, None, None, :]
    causal = rel >= 0
    window = ctx.kwargs.get("sliding_window")
    if window is not None:
        causal = causal & (rel < window)
    allowed = ctx.allowed()
    return not torch.equal(*torch.broadcast_tensors(allowed, causal))


def make_attention_function(base_name: str) -> Callable:
    def rope_ext_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
        runtime: Runtime = module.rope_ext_runtime
        state = runtime.state
        q_len, kv_len = query.shape[2], key.shape[2]
        pos = state.position_ids
        if pos is None or pos.shape[-1] != q_len:
            pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[None, :]
        q_pos = pos.to(query.device).expand(query.shape[0], -1)
        layer_type = getattr(module, "rope_ext_layer_type", None)
        spec = runtime.specs.get(layer_type) or next(iter(runtime.specs.values()))
        ctx = AttentionContext(
            module=module, runtime=runtime, spec=spec, base_name=base_name, mask=attention_mask,
            q_pos=q_pos, k_pos=key_positions(q_pos, kv_len),
            scaling=module.head_dim ** -0.5 if scaling is None else scaling, dropout=dropout, kwargs=kwargs,
        )
        method = runtime.method
        if method.logn:
            query = query * logn_scale(q_pos, method.trained_length).to(query.dtype)[:, None, :, None]
        if runtime.train_attention is not None and module.training:
            if _has_padding(ctx):
                raise ValueError("train_attention (e.g. S2-Attn) needs unpadded, packed batches; got a padding mask")
            if method.rotation == "deferred":
                query, key = ctx.rotate(query, ctx.q_pos, "q"), ctx.rotate(key, ctx.k_pos, "k")
            return runtime.train_attention.attend(query, key, value, ctx.causal), None
        return method.attend(query, key, value, ctx), None

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
