"""What every method is: a frozen dataclass of validated parameters plus pure formulas.

A method answers three questions, and nothing else:
  * ``frequencies(spec, seq_len)``: the inverse frequencies theta_i and the cos/sin magnitude;
  * ``rotation``: who rotates q and k -- the model's own rotary module ("static", zero overhead),
    our attention function per forward pass from the current length ("deferred": keys are cached
    unrotated, so a KV cache never holds keys rotated for an older length), or nobody ("none");
  * ``attend(q, k, v, ctx)``: the attention scores, when the method changes more than frequencies.
The patch mechanism (``rope_ext.patch``) and the attention seam (``rope_ext.attention``) do the rest.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from ..attention import AttentionContext

Rotation = Literal["static", "deferred", "none"]


@dataclass(frozen=True)
class RopeSpec:
    """The family-agnostic facts about a model's RoPE that the formulas need."""

    rope_theta: float
    rotary_dim: int
    trained_length: int
    head_dim: int
    num_heads: int

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")


def rope_inv_freq(base: float, dim: int) -> torch.Tensor:
    """RoPE's theta_i = base^(-2i/d), i = 0 .. d/2-1 (Su et al. 2021, RoFormer, eq. 15).

    Computed exactly as transformers does (float32 powers of an int64 arange), so that factor 1 is
    bitwise identical to the unpatched model.
    """
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base of every registered method. Subclasses are frozen dataclasses that validate in
    ``__post_init__`` and set the class variables below."""

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["frequency", "attention"]] = "frequency"
    rotation: ClassVar[Rotation] = "static"
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    for_pretrained_rope: ClassVar[bool] = True

    logn: bool = False
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        check_type(self, "logn", bool)
        if self.original_max_position_embeddings is not None:
            check_int(self, "original_max_position_embeddings", minimum=1)

    def bind(self, spec: RopeSpec) -> Method:
        """A copy with every value that depends on the model filled in and checked against it
        (trained length, factor from a target length, window below the trained length ...)."""
        trained = self.original_max_position_embeddings or spec.trained_length
        return dataclasses.replace(self, original_max_position_embeddings=trained)

    @property
    def trained_length(self) -> int:
        if self.original_max_position_embeddings is None:
            raise ValueError(f"{self.name}: original_max_position_embeddings is not known; bind() the method first")
        return self.original_max_position_embeddings

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """(theta_i, attention_scaling) for this method; plain RoPE by default."""
        return rope_inv_freq(spec.rope_theta, spec.rotary_dim), 1.0

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Attention output (B, Lq, H, d). Default: rotate if deferred, then the model's own attention."""
        if self.rotation == "deferred":
            query, key = ctx.rotate(query, ctx.q_pos, "q"), ctx.rotate(key, ctx.k_pos, "k")
        return ctx.base(query, key, value)

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any] | None:
        """The ``config.rope_parameters`` of transformers' own rope_type with the same formula, if any."""
        return None

    @property
    def needs_attention_hook(self) -> bool:
        return self.rotation != "static" or self.logn or type(self).attend is not Method.attend

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe_params(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of each parameter, for ``rope-ext methods``."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "required"
            rows.append((f.name, str(f.type), default))
        return rows


def check_type(method: Method, field: str, kind: type | tuple[type, ...]) -> None:
    value = getattr(method, field)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind in (float, (int, float)) and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TypeError(f"{method.name}: {field} must be {want}, got {type(value).__name__}: {value!r}")


def check_int(method: Method, field: str, minimum: int | None = None) -> None:
    check_type(method, field, int)
    value = getattr(method, field)
    if minimum is not None and value < minimum:
        raise ValueError(f"{method.name}: {field} must be an integer >= {minimum}, got {value}")


def check_number(method: Method, field: str, *, above: float | None = None, at_least: float | None = None) -> None:
    check_type(method, field, (int, float))
    value = float(getattr(method, field))
    if not math.isfinite(value):
        raise ValueError(f"{method.name}: {field} must be finite, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{method.name}: {field} must be > {above}, got {value}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{method.name}: {field} must be >= {at_least}, got {value}")
