"""patch / unpatch / patched / current: turn a method on in ONE loaded model, atomically and reversibly.

Frequency methods write new theta_i and cos/sin magnitude into the model's rotary module (the model
rotates as usual: zero overhead). Methods that change attention, or that must re-rotate cached keys
(dynamic NTK / YaRN, ReRoPE ...), make the rotary module hand out the identity rotation, so q and k
reach -- and the KV cache stores -- them unrotated (the model's own rotation by those tables is
skipped: ``rope_ext.fused_rotary``), and select rope_ext's attention function for this model only
(``rope_ext.attention``). Every write goes through one Recorder kept on the model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import attention, cache, fused_rotary
from .facts import main_spec, model_specs
from .methods import registry
from .methods.base import Method
from .methods.context import CachePolicy
from .methods.spec import RopeSpec
from .recorder import Recorder
from .rotary import resolve_kernel

ATTR = "rope_ext_patch"
PATCH_KERNELS = ("auto", "triton", "torch")


def patch(model: nn.Module, method: str, *, replace: bool = False, kernel: str = "auto",
          train_attention: Any = None, **params: Any) -> Patch:
    """Turn ``method`` on in ``model`` (in place) and return the Patch handle.

    ``params`` are the method's own (``factor`` / ``target_length``, ``window``, ``logn`` ...; see
    ``rope-ext methods``). ``replace=True`` swaps an active patch; ``kernel`` picks the rotary
    implementation ("auto": Triton on CUDA, torch elsewhere): with Triton, methods that rotate in
    rope_ext's attention function use the fused kernel there, and static frequency methods route the
    model's own ``apply_rotary_pos_emb`` through it (``rope_ext.fused_rotary``);
    ``train_attention`` is an attention pattern used only in training mode (LongLoRA's S2-Attn).
    Everything is validated before the model is touched; on any error the model is unchanged.
    """
    old = current(model)
    if old is not None and not replace:
        raise ValueError(f"model is already patched with {old.describe()}; call rope_ext.unpatch(model) first or pass replace=True")
    family, bound, specs, kernel = _resolve(model, method, kernel, train_attention, params)
    if old is not None:
        unpatch(model)
    return _apply(model, family, bound, specs, kernel, train_attention)


def unpatch(model: nn.Module) -> None:
    """Restore ``model`` exactly as it was before ``patch`` (buffers, config, attention choice)."""
    handle = current(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by rope_ext; nothing to unpatch")
    handle.recorder.undo()


@contextlib.contextmanager
def patched(model: nn.Module, method: str, **params: Any) -> Iterator[Patch]:
    """``with rope_ext.patched(model, "yarn", factor=8): ...`` -- patch, then always unpatch."""
    handle = patch(model, method, **params)
    try:
        yield handle
    finally:
        if current(model) is handle:
            unpatch(model)


def current(model: nn.Module) -> Patch | None:
    """The active Patch of ``model``, or None."""
    return _checked(model).__dict__.get(ATTR)


def _checked(model: Any) -> nn.Module:
    """``model`` if it is a transformers model (an nn.Module with a config), else a TypeError."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel (e.g. from rope_ext.load), got {type(model).__name__}")
    return model


@dataclass
class Patch:
    """What is active on a model, and how to undo it."""

    method: Method
    family: str
    specs: dict[str | None, RopeSpec]
    attn_implementation: str | None
    kernel: str
    recorder: Recorder = dataclasses.field(repr=False)

    @property
    def name(self) -> str:
        return self.method.name

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.method.params().items() if v is not None)
        return f"{self.name}({params}) on {self.family}" + (f" via {self.attn_implementation}" if self.attn_implementation else "")


def _resolve(model: nn.Module, method: str, kernel: str, train_attention: Any, params: dict[str, Any]):
    from rope_ext.patches import family_for

    first = next(model.parameters(), None)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no parameters: not a language model rope_ext can patch")
    device = first.device
    if kernel not in PATCH_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(PATCH_KERNELS)} for rope_ext.patch, got {kernel!r} "
                         "('compiled' is a backend of rope_ext.rotary.apply_rotary, which 'auto' picks there)")
    kernel = resolve_kernel(kernel, device)
    family = family_for(model)
    built = build_method(method, params)
    specs = model_specs(model, family, built.original_max_position_embeddings)
    bound = built.bind(main_spec(specs))
    bound.check_reach()
    specs = {lt: dataclasses.replace(s, trained_length=bound.trained_length) for lt, s in specs.items()}
    if (bound.needs_attention_hook or train_attention is not None) and not family.attention_interface:
        raise ValueError(f"{method} changes attention, but {family.name} does not use transformers' AttentionInterface; "
                         f"only static frequency methods apply: {', '.join(n for n in registry.names() if registry.get(n).rotation == 'static' and registry.get(n).kind == 'frequency')}")
    if train_attention is not None:
        if bound.kind != "frequency" or bound.cache_policy() is not None:
            raise ValueError(f"train_attention combines with frequency methods only (without a cache policy), not {bound.name}")
        if not callable(getattr(train_attention, "attend", None)):
            raise TypeError("train_attention must have an attend(query, key, value, causal) method")
    return family, bound, specs, kernel


def build_method(method: str, params: dict[str, Any]) -> Method:
    """Construct a registered method from keyword parameters, with errors that list what is allowed."""
    cls = registry.get(method)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"{method}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    try:
        return cls(**params)
    except TypeError as err:
        if "missing" in str(err):
            required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            raise TypeError(f"{method}: missing required parameter(s): {', '.join(required)}") from None
        raise


def _apply(model, family, method: Method, specs, kernel: str, train_attention: Any) -> Patch:
    rec = Recorder()
    try:
        attn_name = None
        if method.rotates == "static":
            _write_frequencies(rec, model, family, method, specs)
        if method.needs_attention_hook or train_attention is not None:
            base = model.config._attn_implementation or "eager"
            attn_name = attention.register(base)
            runtime = attention.Runtime(method=method, specs=specs, train_attention=train_attention, rotary_kernel=kernel)
            for rotary in family.rotary_modules(model):
                if method.rotates == "static":
                    forward = _observing_forward(rotary, runtime)
                else:
                    forward = _identity_forward(rotary, runtime, next(iter(specs.values())).rotary_dim)
                rec.setattr(rotary, "forward", forward)
            for module in family.attention_modules(model):
                rec.setattr(module, "rope_ext_runtime", runtime)
                rec.setattr(module, "rope_ext_layer_type", family.layer_type_of(module))
            for config in model_configs(model):
                rec.setattr(config, "_attn_implementation_internal", attn_name)
            policy = method.cache_policy()
            if policy is None and method.uses_layer_memory:
                policy = CachePolicy()
            if policy is not None:
                cache.install(rec, model, policy, runtime.note_cache)
        if method.rotates == "static" and kernel == "triton":
            fused_rotary.install(rec, family, model, kernel)
        elif method.rotates != "static":
            fused_rotary.install(rec, family, model, fused_rotary.IDENTITY)
        _write_config(rec, model, family, method, specs)
        handle = Patch(method=method, family=family.name, specs=specs, attn_implementation=attn_name, kernel=kernel, recorder=rec)
        rec.setattr(model, ATTR, handle)
        return handle
    except BaseException:
        rec.undo()
        raise


def _identity_forward(rotary: nn.Module, runtime: attention.Runtime, rotary_dim: int):
    """Rotary forward handing out cos = 1, sin = 0 (q, k stay unrotated) and noting the positions."""

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        runtime.new_forward(position_ids)
        shape = (*position_ids.shape, rotary_dim)
        return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)

    return forward


def _observing_forward(rotary: nn.Module, runtime: attention.Runtime):
    """Rotary forward unchanged, noting the positions for the attention function."""
    original = type(rotary).forward

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        runtime.new_forward(position_ids)
        return original(rotary, x, position_ids, *args, **kwargs)

    return forward


def _write_frequencies(rec: Recorder, model: nn.Module, family, method: Method, specs) -> None:
    for rotary in family.rotary_modules(model):
        rope_type = rotary.rope_type
        for layer_type in family.layer_types(rotary):
            prefix = family.buffer_prefix(layer_type)
            old = getattr(rotary, f"{prefix}inv_freq")
            inv_freq, scaling = method.frequencies(specs[layer_type])
            inv_freq = inv_freq.to(device=old.device, dtype=old.dtype)
            rec.setattr(rotary, f"{prefix}inv_freq", inv_freq)
            rec.setattr(rotary, f"{prefix}original_inv_freq", inv_freq.clone())
            rec.setattr(rotary, f"{prefix}attention_scaling", scaling)
        new_type = {k: "default" for k in rope_type} if isinstance(rope_type, dict) else "default"
        rec.setattr(rotary, "rope_type", new_type)


NOT_NATIVE = "{method} is not applied by a plain transformers load; load with rope_ext.load(path)"


def _write_config(rec: Recorder, model: nn.Module, family, method: Method, specs) -> None:
    """Record the method in the config so a saved checkpoint reproduces it: transformers' own
    rope_parameters where it has the same formula, and always a ``rope_ext`` block. Otherwise the
    rope_parameters get a ``rope_ext`` key, which makes a plain transformers load warn. A method made
    for a target length sets ``max_position_embeddings`` to it (transformers' generation limit, and
    what lm-eval and serving engines read as the model's length); the block keeps the original."""
    config = model.config
    original = copy.deepcopy(config.rope_parameters)
    original_length = config.max_position_embeddings
    if method.context_length is not None and method.context_length != original_length:
        rec.setattr(config, "max_position_embeddings", method.context_length)
    native = {lt: method.transformers_equivalent(spec) for lt, spec in specs.items()}
    layered = list(native) != [None]
    keep = ("partial_rotary_factor",)

    def rewrite(old: dict, new: dict | None) -> dict:
        if new is None:
            return {**old, "rope_ext": NOT_NATIVE.format(method=method.name)}
        return {**{k: old[k] for k in keep if k in old}, **new}

    def rewritten(native: dict) -> dict:
        if layered:
            return {lt: rewrite(config.rope_parameters[lt], p) for lt, p in native.items()}
        return rewrite(config.rope_parameters, native[None])

    parameters = rewritten(native)
    if not _accepted(config, parameters):
        parameters = rewritten(dict.fromkeys(native))
    rec.setattr(config, "rope_parameters", parameters)
    block = {"method": method.name, "params": _jsonable(method.params()), "original_rope_parameters": original,
             "original_max_position_embeddings": original_length}
    rec.setattr(config, "rope_ext", block)


def _accepted(config: Any, rope_parameters: dict) -> bool:
    """Whether the family's config class accepts these rope_parameters (Phi-3's accepts only its own
    default / longrope types): if not, the method is saved as rope_ext's only, never as a config
    that transformers refuses to save or load."""
    from transformers.utils import logging as hf_logging

    trial = copy.deepcopy(config)
    trial.rope_parameters = rope_parameters
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warning about the rope_ext marker is for a plain load, not this trial
    try:
        trial.validate_rope()
    except (ValueError, KeyError, TypeError):
        return False
    finally:
        hf_logging.set_verbosity(verbosity)
    return True


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def model_configs(model: nn.Module) -> list[Any]:
    """Every distinct config object of ``model``'s modules that selects an attention implementation."""
    seen, configs = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs
