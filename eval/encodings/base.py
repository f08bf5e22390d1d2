"""The contract of a train-time position encoding for the lab, and the glue its attention uses.

An ``Encoding`` is a frozen dataclass of validated parameters (``__post_init__``) that ``install``s
itself on a freshly built lab ``LlamaForCausalLM``: its learned parameters become submodules of each
layer's ``self_attn`` (so ``state_dict`` / ``save_pretrained`` carry them), and attention uses them
through a function registered with transformers' ``AttentionInterface`` as ``lab_<name>`` and
selected in this model's config only (no global change to transformers).

The glue below serves encodings that replace attention's logits: ``attach`` puts one module per layer
on ``self_attn`` as ``lab_pe``; ``use_attention`` selects ``lab_<name>``, which calls that module as
``lab_pe(query, key, value, call)`` (heads repeated for GQA; ``call``: positions, mask, scaling) and
expects (B, H, Lq, d) back (called on blocks of query rows, each row's output depending on its own row
only, so that the (B, H, Lq, Lk) tensors of a long prompt stay within ``PAIRS_PER_CALL``); ``softmax_attention`` is the float32 softmax with an additive bias;
``remove_rotation`` makes the model's RoPE the identity (cos 1, sin 0) for encodings without it.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rope_ext.methods import key_positions

ATTRIBUTE = "lab_pe"  # the per-layer module of an encoding, on each layer's self_attn
PREFIX = "lab_"
PAIRS_PER_CALL = 2**24  # (batch, head, query, key) pairs per call of an encoding's module: long prompts go by query rows


@dataclass(frozen=True, kw_only=True)
class Encoding(abc.ABC):
    """Base of every registered encoding: subclasses set the class variables, validate their fields
    in ``__post_init__`` (``rope_ext.validate``) and implement ``install``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    rope_based: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Validate the parameters; an encoding without parameters has nothing to check."""

    @abc.abstractmethod
    def install(self, model: torch.nn.Module) -> None:
        """Make the freshly built lab model ``model`` use this encoding (before training or loading)."""

    def inference(self) -> tuple[str, dict] | None:
        """(rope_ext method, parameters) a loaded checkpoint runs with, or None: as trained."""
        return None


@dataclass(frozen=True)
class AttentionCall:
    """What one attention call sees: positions of the queries (B, Lq) and keys (B, Lk), which keys
    each query may attend (B, 1, Lq, Lk; causal + padding), and the logit scaling."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    allowed: torch.Tensor
    scaling: float


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's ``self_attn`` of a lab (Llama) model."""
    return [layer.self_attn for layer in model.model.layers]


def attach(model: torch.nn.Module, make: Callable[[int], torch.nn.Module]) -> None:
    """Put ``make(layer_index)`` on every layer's ``self_attn`` as ``lab_pe``."""
    for index, attn in enumerate(attention_layers(model)):
        attn.add_module(ATTRIBUTE, make(index))


def remove_rotation(model: torch.nn.Module) -> None:
    """Make this model's RoPE the identity: inverse frequencies 0 give cos 1, sin 0 at every position
    (q * 1 + rotate_half(q) * 0 = q exactly). The buffers are not saved; install sets them again."""
    rotary = model.model.rotary_emb
    for buffer in ("inv_freq", "original_inv_freq"):
        setattr(rotary, buffer, torch.zeros_like(getattr(rotary, buffer)))


def register_attention(name: str, function: Callable) -> str:
    """Register ``function`` (with sdpa's mask function) as the attention ``name`` once; returns the name."""
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, function)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def use_attention(model: torch.nn.Module, name: str) -> str:
    """Register ``lab_<name>`` (``lab_attention``) once and select it on ``model``."""
    model.config._attn_implementation = register_attention(PREFIX + name, lab_attention)
    return model.config._attn_implementation


def allowed_keys(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B, 1, Lq, Lk) True where a query may attend a key: the model's mask (bool, or additive float)
    or, when it is None (no padding), causal by index with the queries last."""
    if mask is None:
        i = torch.arange(kv_len - q_len, kv_len, device=device)
        j = torch.arange(kv_len, device=device)
        return (j[None, :] <= i[:, None]).expand(batch, 1, q_len, kv_len)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed[:, :, :, :kv_len].expand(batch, 1, q_len, kv_len)


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, L, d) -> (B, heads, L, d), each KV head serving heads / H_kv query heads."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scaling q k^T + bias, masked) v with the logits and softmax in float32; (B, H, Lq, d)."""
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * call.scaling
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~call.allowed, torch.finfo(torch.float32).min)
    return torch.matmul(logits.softmax(dim=-1).to(value.dtype), value)


def lab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``lab_<name>``: builds the call and runs the layer's ``lab_pe``."""
    if dropout:
        raise ValueError(f"lab encodings train without attention dropout; got dropout={dropout}")
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    if position_ids is None or position_ids.shape[-1] != q_len:
        position_ids = torch.arange(kv_len - q_len, kv_len, device=query.device)[None, :]
    q_pos = position_ids.to(query.device).expand(batch, q_len)
    k_pos = key_positions(q_pos, kv_len)
    allowed = allowed_keys(attention_mask, batch, q_len, kv_len, query.device)
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    rows = max(1, PAIRS_PER_CALL // (batch * heads * kv_len))
    out = torch.cat([getattr(module, ATTRIBUTE)(query[:, :, s:s + rows], key, value,
                                                AttentionCall(q_pos=q_pos[:, s:s + rows], k_pos=k_pos,
                                                              allowed=allowed[:, :, s:s + rows], scaling=scaling))
                     for s in range(0, q_len, rows)], dim=2)
    return out.transpose(1, 2).contiguous(), None
