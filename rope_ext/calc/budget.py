"""What a context length costs: KV-cache bytes and attention FLOPs for a model config (MHA, GQA,
MQA, and MLA as in DeepSeek-V2/V3), per dtype and batch size. Pure arithmetic on an
``AttentionShape`` (``rope_ext.calc.model.attention_shape`` reads one from a transformers config).

Conventions (the numbers are only comparable under one):
  * FLOPs count a multiply-add as 2 (as in Kaplan et al. 2020 and the FlashAttention papers).
  * Attention FLOPs of a prefill of L tokens per layer: Q K^T costs 2 d_qk and P V costs 2 d_v per
    (query, key) pair and head; a causal prefill has L (L + 1) / 2 pairs (the exact lower triangle,
    i.e. about half of the 2 * 2 * L^2 * d * heads of a full attention matrix); a sliding-window
    layer of window W has sum_i min(i + 1, W). Softmax and masking are not counted.
  * Projections (q, k, v, o, and MLA's down/up projections) are counted separately: linear in L.
  * KV bytes are what the cache holds after L tokens: K and V per layer, per KV head (a sliding
    layer keeps W - 1 tokens). For MLA it is the paper's latent cache, kv_lora_rank +
    qk_rope_head_dim elements per token per layer (DeepSeek-V2, DeepSeek-AI 2024, sec. 2.1.2), which
    is what transformers 5.x, vLLM and SGLang store; a naive cache of every head's decompressed K and
    V is reported alongside (``kv_bytes_decompressed``) to show what MLA saves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..validate import MAX_COUNT, integer
from .bound import check_length

BYTES_PER_ELEMENT: dict[str, float] = {
    "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
    "float8": 1, "fp8": 1, "int8": 1, "int4": 0.5,
}


def check_batch_size(batch_size: int) -> int:
    """Sequences per batch: 1 .. 2^24 (``rope_ext.validate``)."""
    return integer(batch_size, "batch_size", minimum=1, maximum=MAX_COUNT)


def bytes_per_element(dtype: str | float) -> float:
    """Bytes per cached element for a dtype name (``bfloat16``, ``fp8``, ``int4`` ...) or a number."""
    if isinstance(dtype, str):
        try:
            return float(BYTES_PER_ELEMENT[dtype.lower()])
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(BYTES_PER_ELEMENT)} (or a number of bytes)") from None
    if isinstance(dtype, bool) or not isinstance(dtype, (int, float)) or not math.isfinite(dtype) or dtype <= 0:
        raise ValueError(f"bytes per element must be a dtype name or a number > 0, got {dtype!r}")
    return float(dtype)


@dataclass(frozen=True)
class AttentionShape:
    """The attention facts of a decoder that the cost depends on. ``kind`` is MHA (kv heads = heads),
    GQA (1 < kv heads < heads), MQA (1 kv head) or MLA (latent KV: ``kv_lora_rank`` set)."""

    kind: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    hidden_size: int
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    q_lora_rank: int | None = None
    sliding_window: int | None = None
    sliding_layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cached_tokens(shape: AttentionShape, length: int) -> int:
    """Sum over layers of the tokens each layer's cache holds after ``length`` tokens: all of them,
    or W - 1 in a sliding layer of window W (the next token attends to those and itself; this is
    what transformers' sliding-window cache keeps)."""
    L = check_length(length)
    full = shape.num_layers - shape.sliding_layers
    return full * L + shape.sliding_layers * min(L, (shape.sliding_window or L + 1) - 1)


def kv_cache_bytes(shape: AttentionShape, length: int, batch_size: int = 1, dtype: str | float = "bfloat16") -> float:
    """KV-cache bytes after ``length`` tokens:
    MHA/GQA/MQA: batch * sum_layers(tokens) * kv_heads * (d_k + d_v) * bytes, which for a model
    without sliding layers is 2 * layers * kv_heads * head_dim * L * bytes * batch;
    MLA (DeepSeek-V2, sec. 2.1.2): batch * layers * L * (kv_lora_rank + qk_rope_head_dim) * bytes."""
    batch, size = check_batch_size(batch_size), bytes_per_element(dtype)
    tokens = cached_tokens(shape, length)
    if shape.kind == "MLA":
        return batch * tokens * (shape.kv_lora_rank + shape.qk_rope_head_dim) * size
    return batch * tokens * shape.num_kv_heads * (shape.qk_head_dim + shape.v_head_dim) * size


def kv_cache_bytes_decompressed(shape: AttentionShape, length: int, batch_size: int = 1, dtype: str | float = "bfloat16") -> float:
    """KV bytes when every head's K and V are cached in full (for MLA: the decompressed heads, as a
    naive implementation would): batch * sum_layers(tokens) * kv_heads * (d_qk + d_v) * bytes."""
    batch, size = check_batch_size(batch_size), bytes_per_element(dtype)
    return batch * cached_tokens(shape, length) * shape.num_kv_heads * (shape.qk_head_dim + shape.v_head_dim) * size


def causal_pairs(length: int, window: int | None = None) -> int:
    """(query, key) pairs of a causal prefill: L (L + 1) / 2, or sum_i min(i + 1, W) with a window."""
    L = check_length(length)
    if window is None or window >= L:
        return L * (L + 1) // 2
    return window * (window + 1) // 2 + (L - window) * window


def attention_flops(shape: AttentionShape, length: int, batch_size: int = 1, causal: bool = True) -> float:
    """Score and value matmul FLOPs of a prefill of ``length`` tokens (module docstring):
    batch * heads * 2 (d_qk + d_v) * pairs, summed over layers; pairs = L (L + 1) / 2 causal
    (L^2 when ``causal=False``). MLA is counted as computed in training / prefill, with decompressed
    heads (d_qk = qk_nope_head_dim + qk_rope_head_dim)."""
    L, batch = check_length(length), check_batch_size(batch_size)
    full_pairs = causal_pairs(L) if causal else L * L
    sliding_pairs = causal_pairs(L, shape.sliding_window) if causal else L * min(L, shape.sliding_window or L)
    pairs = (shape.num_layers - shape.sliding_layers) * full_pairs + shape.sliding_layers * sliding_pairs
    return float(batch * shape.num_heads * 2 * (shape.qk_head_dim + shape.v_head_dim) * pairs)


def decode_attention_flops(shape: AttentionShape, context: int, batch_size: int = 1) -> float:
    """Score and value FLOPs of generating one token after ``context`` tokens: batch * heads *
    2 (d_qk + d_v) * sum_layers(keys attended), the keys being the cached ones plus its own."""
    batch = check_batch_size(batch_size)
    keys = cached_tokens(shape, context) + shape.num_layers
    return float(batch * shape.num_heads * 2 * (shape.qk_head_dim + shape.v_head_dim) * keys)


def projection_flops(shape: AttentionShape, length: int, batch_size: int = 1) -> float:
    """FLOPs of the attention's linear projections for ``length`` tokens (2 per multiply-add):
    MHA/GQA/MQA: q (h -> H d), k and v (h -> kv d), o (H d_v -> h);
    MLA (DeepSeek-V2, sec. 2.1): q (h -> q_lora -> H d_qk, or h -> H d_qk), kv down (h -> kv_lora +
    d_rope), kv up (kv_lora -> H (d_nope + d_v)), o (H d_v -> h)."""
    L, batch = check_length(length), check_batch_size(batch_size)
    h, H = shape.hidden_size, shape.num_heads
    if shape.kind == "MLA":
        q = h * shape.q_lora_rank + shape.q_lora_rank * H * shape.qk_head_dim if shape.q_lora_rank else h * H * shape.qk_head_dim
        nope = shape.qk_head_dim - shape.qk_rope_head_dim
        kv = h * (shape.kv_lora_rank + shape.qk_rope_head_dim) + shape.kv_lora_rank * H * (nope + shape.v_head_dim)
    else:
        q = h * H * shape.qk_head_dim
        kv = h * shape.num_kv_heads * (shape.qk_head_dim + shape.v_head_dim)
    o = H * shape.v_head_dim * h
    return float(2 * batch * L * shape.num_layers * (q + kv + o))


def budget(shape: AttentionShape, length: int, batch_size: int = 1, dtype: str | float = "bfloat16") -> dict[str, Any]:
    """Every figure above for one length, as plain data (the calculator's table row / JSON)."""
    row = {
        "length": check_length(length), "batch_size": check_batch_size(batch_size),
        "bytes_per_element": bytes_per_element(dtype),
        "kv_bytes": kv_cache_bytes(shape, length, batch_size, dtype),
        "attention_flops": attention_flops(shape, length, batch_size),
        "projection_flops": projection_flops(shape, length, batch_size),
        "decode_attention_flops_per_token": decode_attention_flops(shape, length, batch_size),
    }
    if shape.kind == "MLA":
        row["kv_bytes_decompressed"] = kv_cache_bytes_decompressed(shape, length, batch_size, dtype)
    return row
