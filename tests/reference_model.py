"""An independent reference for every registered method: logits computed from the papers' formulas
with dense score matrices, importing nothing from rope_ext.

The reference runs the *unpatched* transformers model with two hooks of its own: every rotary module
returns cos = 1, sin = 0 (so q and k reach attention unrotated), and attention is a dense function
registered with transformers' AttentionInterface under ``REFERENCE``. It computes, per head,

    S_ij = scale_i * mscale^2 * sum_f Re(z_q[i, f] * conj(z_k[j, f]) * exp(i * r(i, j) * theta_f))
           + q_pass[i] . k_pass[j]                               (RoFormer, eq. 16: complex form)

with z = x[:d/2] + i x[d/2:d] (transformers' rotate-half layout, d the rotary dims), theta_f the
method's frequencies, r(i, j) its relative-position map, scale_i log-n's factor, then the model's
scaling, softcap, ALiBi's bias, the causal / padding / sliding-window mask, softmax and V -- all in
float64. A family without AttentionInterface (Falcon) gets frequency methods through explicit
cos/sin tables instead.

Formulas, with s the factor, b the base, L0 the trained length, L the current length:
  PI (Chen et al. 2023, eq. 4)            theta / s
  NTK-aware (bloc97; YaRN eq. 16)        base b * s^(d/(d-2))
  dynamic NTK (emozilla; YaRN sec. 3.3)  base b * (s L / L0 - (s - 1))^(d/(d-2)) when L > L0
  NTK-by-parts (YaRN eq. 17-19)          (1 - g) theta / s + g theta, g = clip((L0 / lambda - a) / (b - a))
  YaRN (Peng et al. 2023)                by-parts over dimensions (reference code's correction range),
                                         cos/sin times 0.1 ln s + 1; dynamic: s = max(1, s L / L0)
  Llama 3.1 (Meta 2024)                  wavelength < L0 / high: theta; > L0 / low: theta / s; smooth between
  ReRoPE (Su 2023)                       r' = r if r < w else w
  Leaky ReRoPE (Su 2023)                 r' = r if r < w else w + (r - w) / k
  Self-Extend (Jin et al. 2024, eq. 3)   r' = r if r < w else floor(i / G) - floor(j / G) + w - floor(w / G)
  DCA (An et al. 2024, eq. 2, 5, 7)      s = chunk_size - local_window; r' = P_q[i] - (j mod s) with P_q from
                                         ChunkLlama's tables by floor(i/s) - floor(j/s): 0 -> q_t[i mod s],
                                         1 -> qc_t[i mod s], > 1 -> qc_t[s - 1]; q_t = 0..s-1,
                                         qc_t = min(s..2s-1, chunk_size)
  log-n (Su 2023)                        q_i * max(1, ln(i + 1) / ln L0)
  ALiBi (Press et al. 2022)              no rotation; bias -m_h (i - j), m_h = 2^(-8 h / n) (power-of-two n)
  NoPE (Kazemnejad et al. 2023)          no rotation
  LongNet dilated (Ding et al. 2023)     plain RoPE; per pair (w, r) and head h, key j is seen by query i
                                         iff floor(i/w) = floor(j/w) and i = j = h (mod r) (eq. 5-9);
                                         outputs O_p merged with alpha_p = s_p / sum s (eq. 10-11)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from reference_block_memory import block_memory_attention

REFERENCE = "reference_dense"
FREQUENCY_METHODS = ("none", "pi", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn", "dynamic_yarn", "llama3")
WINDOWED_METHODS = ("rerope", "leaky_rerope", "self_extend")
UNROTATED_METHODS = ("alibi", "nope")
MASKED_METHODS = ("dilated",)
CHUNKED_METHODS = ("dca",)
BLOCK_METHODS = ("block_memory",)
METHODS = FREQUENCY_METHODS + WINDOWED_METHODS + UNROTATED_METHODS + MASKED_METHODS + CHUNKED_METHODS + BLOCK_METHODS


def rope_theta(b: float, d: int) -> torch.Tensor:
    """theta_f = b^(-2f/d), f = 0 .. d/2 - 1 (RoFormer, eq. 15)."""
    return b ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def yarn_theta(b: float, d: int, s: float, L0: int, beta_fast: float, beta_slow: float, truncate: bool) -> torch.Tensor:
    """YaRN's frequencies as in its reference code: dimensions below the one that turns beta_fast times
    in L0 keep theta, those above the one that turns beta_slow times take theta / s, linear between."""
    theta = rope_theta(b, d)
    if s == 1:
        return theta

    def dim_turning(turns: float) -> float:
        return d * math.log(L0 / (turns * 2 * math.pi)) / (2 * math.log(b))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    interpolated_share = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return theta / s * interpolated_share + theta * (1 - interpolated_share)


def yarn_temperature(s: float) -> float:
    """sqrt(1/t) = 0.1 ln s + 1 (YaRN eq. 22), on cos and sin: logits scale by its square."""
    return 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0


def by_parts_theta(theta: torch.Tensor, s: float, L0: int, alpha: float, beta: float) -> torch.Tensor:
    """YaRN eq. 17-19: r = L0 / lambda wavelengths in the trained length; g = clip((r - a)/(b - a), 0, 1)."""
    r = L0 * theta / (2 * math.pi)
    g = ((r - alpha) / (beta - alpha)).clamp(0, 1)
    return (1 - g) * theta / s + g * theta


def llama3_theta(theta: torch.Tensor, s: float, L0: int, low: float, high: float) -> torch.Tensor:
    """Llama 3.1: keep short wavelengths, divide long ones by s, blend by L0 / lambda in between."""
    wavelength = 2 * math.pi / theta
    smooth = ((L0 / wavelength - low) / (high - low)).clamp(0, 1)
    return torch.where(wavelength > L0 / low, theta / s,
                       torch.where(wavelength < L0 / high, theta, (1 - smooth) * theta / s + smooth * theta))


def frequencies(name: str, p: dict[str, Any], b: float, d: int, L0: int, L: int) -> tuple[torch.Tensor, float]:
    """(theta_f, cos/sin magnitude) of method ``name`` with parameters ``p`` at current length L."""
    s = float(p.get("factor", 1.0))
    if name == "pi":
        return rope_theta(b, d) / s, 1.0
    if name == "ntk":
        return rope_theta(p.get("base") or b * s ** (d / (d - 2)), d), 1.0
    if name == "dynamic_ntk":
        return rope_theta(b * (s * L / L0 - (s - 1)) ** (d / (d - 2)) if L > L0 else b, d), 1.0
    if name == "ntk_by_parts":
        return by_parts_theta(rope_theta(b, d), s, L0, p.get("alpha", 1.0), p.get("beta", 32.0)), 1.0
    if name in ("yarn", "dynamic_yarn"):
        if name == "dynamic_yarn":
            s = max(1.0, s * L / L0)
        theta = yarn_theta(b, d, s, L0, p.get("beta_fast", 32.0), p.get("beta_slow", 1.0), p.get("truncate", True))
        return theta, p.get("attention_factor") or yarn_temperature(s)
    if name == "llama3":
        return llama3_theta(rope_theta(b, d), s, L0, p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)), 1.0
    if name in ("none",) + WINDOWED_METHODS + MASKED_METHODS + CHUNKED_METHODS + BLOCK_METHODS:
        return rope_theta(b, d), 1.0
    raise KeyError(f"no reference frequencies for method {name!r}: add its formula to tests/reference_model.py")


def relative_map(name: str, p: dict[str, Any], i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """r'(i, j) for query positions i (..., Lq, 1) and key positions j (..., 1, Lk)."""
    r = (i - j).to(torch.float64)
    if name == "dca":
        return dca_relative(p["chunk_size"], p["local_window"], i, j)
    if name not in WINDOWED_METHODS:
        return r
    w = p["window"]
    if name == "rerope":
        far = torch.full_like(r, float(w))
    elif name == "leaky_rerope":
        far = w + (r - w) / p["k"]
    else:
        G = p["group_size"]
        far = (torch.div(i, G, rounding_mode="floor") - torch.div(j, G, rounding_mode="floor") + w - w // G).to(torch.float64)
    return torch.where(r < w, r, far)


def dca_relative(chunk_size: int, local_window: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """DCA's M[i][j] (An et al. 2024, sec. 3.3) with ChunkLlama's position tables (chunkllama_attn_replace.py:
    chunk_len s = chunk_size - local_window, q_t = arange(s), qc_t = (arange(s) + s).clamp(max=chunk_size),
    k_t = arange % s; the inter-chunk query uses qc_t[s - 1])."""
    s = chunk_size - local_window
    q_t = torch.arange(s)
    qc_t = (torch.arange(s) + s).clamp(max=chunk_size)
    i, j = torch.broadcast_tensors(i, j)
    gap = i // s - j // s
    query = torch.where(gap == 0, q_t[i % s], torch.where(gap == 1, qc_t[i % s], qc_t[s - 1]))
    return (query - j % s).to(torch.float64)


def alibi_slopes(n: int, max_bias: float) -> torch.Tensor:
    """m_h (Press et al. 2022, sec. 3; the reference code's rule for n not a power of two)."""
    nearest = 2 ** math.floor(math.log2(n))
    slopes = [2 ** (-max_bias * h / nearest) for h in range(1, nearest + 1)]
    slopes += [2 ** (-max_bias * h / (2 * nearest)) for h in range(1, 2 * nearest + 1, 2)][: n - nearest]
    return torch.tensor(slopes, dtype=torch.float64)


def table_parameters(config: Any, layer_type: str | None) -> dict[str, Any]:
    """The model's own rope_parameters for a layer's table (one table, or one per layer type)."""
    params = config.rope_parameters
    if all(isinstance(v, dict) for v in params.values()):
        return params[layer_type or "full_attention"]
    return params


def rotary_dims(config: Any, layer_type: str | None) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * table_parameters(config, layer_type).get("partial_rotary_factor", 1.0))


class Reference:
    """Dense attention for method ``name`` (parameters ``params``, as given to ``rope_ext.patch``) on
    ``model``, for inputs with ``positions`` (B, L) and ``padding`` (B, L; 1 = real token)."""

    def __init__(self, model: Any, name: str, params: dict[str, Any], positions: torch.Tensor, padding: torch.Tensor):
        if name not in METHODS:
            raise KeyError(f"no reference for method {name!r}: add it to tests/reference_model.py")
        self.config, self.name, self.params = model.config, name, params
        self.positions, self.padding = positions, padding.bool()
        self.L0 = int(params.get("original_max_position_embeddings") or model.config.max_position_embeddings)

    def theta(self, layer_type: str | None) -> tuple[torch.Tensor, float]:
        table = table_parameters(self.config, layer_type)
        L = int(self.positions.max()) + 1
        return frequencies(self.name, self.params, float(table["rope_theta"]), rotary_dims(self.config, layer_type), self.L0, L)

    def scores(self, q: torch.Tensor, k: torch.Tensor, layer_type: str | None) -> torch.Tensor:
        """S (B, H, L, L) before scaling: rotated by the relative map, or plain q.k for ALiBi / NoPE."""
        if self.name in UNROTATED_METHODS:
            return q @ k.transpose(-1, -2)
        d = rotary_dims(self.config, layer_type)
        theta, magnitude = self.theta(layer_type)
        zq = torch.complex(q[..., : d // 2], q[..., d // 2: d])
        zk = torch.complex(k[..., : d // 2], k[..., d // 2: d])
        i, j = self.positions[:, None, :, None], self.positions[:, None, None, :]
        turn = torch.exp(1j * relative_map(self.name, self.params, i, j)[..., None] * theta)
        rotary = torch.einsum("bhif,bhjf,bhijf->bhij", zq, zk.conj(), turn).real
        return magnitude ** 2 * rotary + q[..., d:] @ k[..., d:].transpose(-1, -2)

    def attend(self, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        dtype = q.dtype
        q, k, v = q.double(), k.double(), v.double()
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        i, j = self.positions[:, None, :, None], self.positions[:, None, None, :]
        if self.params.get("logn"):
            q = q * (torch.log(self.positions.double() + 1) / math.log(self.L0)).clamp(min=1)[:, None, :, None]
        if self.name in BLOCK_METHODS:
            layer_type = getattr(module, "layer_type", None)
            theta, magnitude = self.theta(layer_type)
            return block_memory_attention(q, k, v, self.positions, self.padding, self.params, theta, magnitude,
                                          rotary_dims(self.config, layer_type), scaling, sliding_window, softcap).to(dtype)
        s = self.scores(q, k, getattr(module, "layer_type", None)) * scaling
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if self.name == "alibi":
            s = s - alibi_slopes(q.shape[1], self.params.get("max_bias", 8.0))[None, :, None, None] * (i - j)
        allowed = (j <= i) & self.padding[:, None, None, :]
        if sliding_window is not None:
            allowed = allowed & (i - j < sliding_window)
        if self.name == "dilated":
            out = dilated_combination(s, v, i, j, allowed, self.params["segments"], self.params["dilations"])
            return out.transpose(1, 2).to(dtype)
        weights = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
        return (weights @ v).transpose(1, 2).to(dtype)


def dilated_combination(s: torch.Tensor, v: torch.Tensor, i: torch.Tensor, j: torch.Tensor, allowed: torch.Tensor,
                        segments: Any, dilations: Any) -> torch.Tensor:
    """LongNet (Ding et al. 2023): for each pair (w, r) a boolean mask per head h (same segment
    floor(i / w) = floor(j / w), rows i and j both = h mod r (mod r), eq. 5-9), its softmax O_p and
    denominator s_p = sum exp(S) over the mask; O = sum_p alpha_p O_p with alpha_p = s_p / sum_q s_q
    (eq. 10-11), computed as explicit log-sum-exps. Scores s (B, H, L, L), float64."""
    h = torch.arange(s.shape[1])[None, :, None, None]
    outs, lses = [], []
    for w, r in zip(segments, dilations):
        same_segment = torch.div(i, w, rounding_mode="floor") == torch.div(j, w, rounding_mode="floor")
        mask = allowed & same_segment & (i % r == h % r) & (j % r == h % r)
        masked = s.masked_fill(~mask, -math.inf)
        lses.append(torch.logsumexp(masked, dim=-1))
        outs.append(torch.softmax(masked, dim=-1).nan_to_num(0.0) @ v)
    lse = torch.stack(lses)
    alpha = torch.exp(lse - torch.logsumexp(lse, dim=0)).nan_to_num(0.0)
    return (alpha[..., None] * torch.stack(outs)).sum(dim=0)


def rotary_modules(model: Any) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def _identity_rotation(module: Any, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = output
    return torch.ones_like(cos), torch.zeros_like(sin)


def _table_rotation(ref: Reference) -> Callable:
    """Explicit cos/sin for a family without AttentionInterface (Falcon): frequency methods only."""
    def hook(module: Any, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if ref.name not in FREQUENCY_METHODS or ref.params.get("logn"):
            raise KeyError(f"{ref.name} needs attention; this family has only its rotary tables")
        theta, magnitude = ref.theta(None)
        angles = ref.positions.double()[..., None] * theta
        angles = torch.cat([angles, angles], dim=-1)
        dtype = output[0].dtype
        return (angles.cos() * magnitude).to(dtype), (angles.sin() * magnitude).to(dtype)
    return hook


_ACTIVE: list[Reference] = []


def _reference_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                         scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                         softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _ACTIVE[-1].attend(module, query, key, value, scaling, sliding_window, softcap), None


AttentionInterface.register(REFERENCE, _reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextmanager
def reference_mode(model: Any, name: str, params: dict[str, Any], positions: torch.Tensor, padding: torch.Tensor,
                   attention: bool = True) -> Iterator[Reference]:
    """Within it ``model`` (unpatched) computes the reference; ``attention=False``: cos/sin tables only."""
    ref = Reference(model, name, params, positions, padding)
    hook = _identity_rotation if attention else _table_rotation(ref)
    handles = [m.register_forward_hook(hook) for m in rotary_modules(model)]
    saved = model.config._attn_implementation_internal
    _ACTIVE.append(ref)
    try:
        if attention:
            model.config._attn_implementation_internal = REFERENCE
        yield ref
    finally:
        _ACTIVE.pop()
        for h in handles:
            h.remove()
        model.config._attn_implementation_internal = saved


def reference_logits(model: Any, name: str, params: dict[str, Any], ids: torch.Tensor, padding: torch.Tensor,
                     attention: bool = True) -> torch.Tensor:
    """Logits of the unpatched ``model`` under the reference of ``name``; positions count real tokens."""
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), reference_mode(model, name, params, positions, padding, attention):
        return model(ids, attention_mask=padding, position_ids=positions).logits
