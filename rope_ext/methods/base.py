"""The method contract: a frozen dataclass of validated parameters that owns its formulas, its
attention, its cache policy and its defaults. A new method is one file in ``rope_ext/methods/`` with
one ``@register``; nothing else changes.

A method answers, and nothing else:
  * ``frequencies(spec, seq_len)``: the inverse frequencies theta_i and the cos/sin magnitude;
  * ``rotation``: who rotates q and k -- the model's own rotary module ("static", zero overhead),
    rope_ext's attention function per forward pass ("deferred": keys are cached unrotated, so a KV
    cache never holds keys rotated for an older length or position), or nobody ("none");
  * ``attend(q, k, v, ctx)``: the attention output, when the method changes more than frequencies
    (``ctx``: ``rope_ext.methods.context.AttentionContext``; call ``rope_ext.kernels`` directly);
  * ``cache_policy()``: what the KV cache keeps and where kept keys sit (``CachePolicy``), or None;
  * ``uses_layer_memory``: True when ``attend`` keeps state of its own in the KV cache (``ctx.memory``);
  * ``defaults_for(spec, length, **given)``: its parameters for a target length (the one source
    that eval, calc and longlora use, and the example the shared test suite runs).
The patch (``rope_ext.patch``) and the glue to transformers (``rope_ext.attention``,
``rope_ext.cache``) do the rest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..validate import MAX_COUNT, boolean, integer, number
from .context import AttentionContext, CachePolicy
from .logn import logn_scale
from .sinks import SinkPolicy
from .spec import RopeSpec

Rotation = Literal["static", "deferred", "none"]
MAX_SETTING = 1e6  # the largest meaningful value of a float parameter without a tighter bound of its own


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
    uses_layer_memory: ClassVar[bool] = False

    logn: bool = False
    original_max_position_embeddings: int | None = None
    sinks: int | None = None
    cache_window: int | None = None

    def __post_init__(self) -> None:
        check_bool(self, "logn")
        if self.original_max_position_embeddings is not None:
            check_int(self, "original_max_position_embeddings", minimum=1)
        if (self.sinks is None) != (self.cache_window is None):
            raise ValueError(f"{self.name}: give sinks and cache_window together (StreamingLLM: e.g. sinks=4, "
                             f"cache_window=2044; sinks=0 for a window-only cache), got sinks={self.sinks!r}, "
                             f"cache_window={self.cache_window!r}")
        if self.sinks is not None:
            check_int(self, "sinks", minimum=0)
            check_int(self, "cache_window", minimum=1)
            if self.kind != "frequency":
                raise ValueError(f"{self.name}: sinks / cache_window combine with plain RoPE and frequency methods "
                                 f"(none, pi, ntk, yarn, llama3, ntk_by_parts, dynamic_ntk, dynamic_yarn), not with "
                                 f"{self.name}, which changes the attention itself")

    def check_reach(self) -> None:
        """A bound method with a rolling cache must reach sinks + cache_window positions: the cache's
        slots are the only positions it ever sees (Xiao et al. 2023, sec. 3.2)."""
        reach = self.reach
        if self.sinks is not None and reach is not None and self.sinks + self.cache_window > reach:
            raise ValueError(f"{self.name}: sinks + cache_window = {self.sinks + self.cache_window} exceeds the "
                             f"{reach} positions this method reaches (trained length {self.trained_length}); give a "
                             f"smaller cache_window or a frequency method with a factor that reaches it")

    @property
    def reach(self) -> int | None:
        """How many positions the bound method handles: the trained length unless it scales."""
        return self.trained_length

    @property
    def context_length(self) -> int | None:
        """The length the bound method is made for, which the patch writes to the config's
        ``max_position_embeddings``; None where it has none (windowed and dynamic methods reach any
        length, plain RoPE keeps the trained one)."""
        return None

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

    @classmethod
    def defaults_for(cls, spec: RopeSpec, length: int, **given: Any) -> dict[str, Any]:
        """The parameters this method runs with to reach ``length`` tokens on a model with ``spec``:
        ``given`` as it is, plus every length-dependent parameter it leaves out. The one source of
        per-method defaults for eval, calc and longlora; also the example parameters the shared test
        suite uses for every registered method. Parameters with a fixed default are left to the
        dataclass. Base methods have none that depend on the length."""
        check_target_length(cls, length)
        return dict(given)

    def frequencies(self, spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """(theta_i, attention_scaling) for this method; plain RoPE by default."""
        return rope_inv_freq(spec.rope_theta, spec.rotary_dim), 1.0

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """What the glue calls: log-n query scaling when ``logn``, then ``attend``."""
        return self.attend(self.scale_query(query, ctx), key, value, ctx)

    def train_attention(self, pattern: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        ctx: AttentionContext) -> torch.Tensor:
        """A training-only attention ``pattern`` (LongLoRA's S2-Attn: ``pattern.attend(q, k, v, causal)``)
        over this method's rotation; only frequency methods combine with one (checked at patch time)."""
        query = self.scale_query(query, ctx)
        if self.rotates == "deferred":
            query, key = ctx.rotate(query, ctx.q_pos, "q"), ctx.rotate(key, ctx.k_pos, "k")
        return pattern.attend(query, key, value, ctx.causal)

    def scale_query(self, query: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Log-n scaling of the queries past the trained length when ``logn`` (``logn.logn_scale``)."""
        if not self.logn:
            return query
        return query * logn_scale(ctx.q_pos, self.trained_length).to(query.dtype)[:, None, :, None]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Attention output (B, Lq, H, d). Default: rotate if deferred, then the model's own attention."""
        if self.rotates == "deferred":
            query, key = ctx.rotate(query, ctx.q_pos, "q"), ctx.rotate(key, ctx.k_pos, "k")
        return ctx.base(query, key, value)

    def cache_policy(self) -> CachePolicy | None:
        """What this method's KV cache keeps (``CachePolicy``): StreamingLLM's sinks + rolling window
        when ``sinks`` and ``cache_window`` are given (``methods/sinks.py``); None: the model's own cache."""
        if self.sinks is None:
            return None
        return SinkPolicy(self.sinks, self.cache_window)

    @property
    def rotates(self) -> Rotation:
        """Who rotates for this instance: ``rotation``, except that a cache policy which re-positions
        keys needs them cached unrotated, so a static method then rotates in the attention function."""
        policy = self.cache_policy()
        if self.rotation == "static" and policy is not None and policy.repositions:
            return "deferred"
        return self.rotation

    def native_rope_parameters(self, spec: RopeSpec) -> dict[str, Any] | None:
        """The ``config.rope_parameters`` of transformers' own rope_type with the same formula, if any."""
        return None

    def transformers_equivalent(self, spec: RopeSpec) -> dict[str, Any] | None:
        """What a saved config can give a plain transformers load: ``native_rope_parameters``, unless a
        cache policy or log-n scaling is on (transformers has neither: a plain load would silently differ)."""
        return None if self.cache_policy() is not None or self.logn else self.native_rope_parameters(spec)

    @property
    def needs_attention_hook(self) -> bool:
        return (self.rotates != "static" or self.logn or type(self).attend is not Method.attend
                or self.cache_policy() is not None)

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


def check_target_length(cls: type[Method], length: int) -> None:
    """``length`` of ``defaults_for``: a whole number of tokens >= 2 (one prediction)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"{cls.name}: the target length must be an int >= 2 tokens, got {length!r}")


def check_bool(method: Method, field: str) -> None:
    """``field`` is True or False."""
    boolean(getattr(method, field), f"{method.name}: {field}")


def check_int(method: Method, field: str, minimum: int | None = None, maximum: int = MAX_COUNT) -> None:
    """``field`` is an int in [minimum, maximum] (every int parameter is a count or length: <= 2^24)."""
    integer(getattr(method, field), f"{method.name}: {field}", minimum=minimum, maximum=maximum)


def check_number(method: Method, field: str, *, above: float | None = None, at_least: float | None = None,
                 at_most: float = MAX_SETTING, above_field: str | None = None) -> None:
    """``field`` is a finite number with the bounds given (<= ``MAX_SETTING`` unless stated);
    ``above_field``: it must exceed that other (already checked) field."""
    if above_field is not None:
        above = float(getattr(method, above_field))
    number(getattr(method, field), f"{method.name}: {field}", above=above, at_least=at_least, at_most=at_most,
           bound_name=above_field)
