"""The model side of a LongLoRA fine-tune: load, check, patch (method + the training attention:
S2-Attn, LongNet's dilated attention, or none), wrap in LoRA with
trained copies of the embeddings and norms (peft ``modules_to_save``), and at the end save the peft
adapter and / or merge it back into a checkpoint that ``rope_ext.load`` restores.

LongLoRA's "LoRA+" (Chen et al. 2023, arXiv 2309.12307, sec. 3.3, Table 2): low-rank adapters on
the attention projections alone do not adapt a model to a longer context; making the embeddings
and normalisation layers trainable as well closes the gap to full fine-tuning at a small cost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rope_ext
from rope_ext.facts import main_spec, model_specs, trained_length
from rope_ext.methods import registry

from .config import FinetuneConfig
from .dilated_pattern import DilatedPattern, dilated_pattern_for
from .s2attn import S2Attn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECORD = "rope_ext.json"  # beside a saved adapter: the position method it was trained with


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_linear(module)]


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the linear layers LoRA adapts. "auto": every linear layer directly inside an
    attention module of the model's family (q/k/v/o, or fused qkv + dense). Other entries match a
    layer's name or its last components (as peft does); one that matches nothing is an error."""
    from rope_ext.patches import family_for

    names = {id(module): name for name, module in model.named_modules()}
    chosen: list[str] = []
    for target in targets:
        if target == "auto":
            found = [f"{names[id(attn)]}.{child}" for attn in family_for(model).attention_modules(model)
                     for child, module in attn.named_children() if _is_linear(module)]
        else:
            found = [n for n in linear_names(model) if n == target or n.endswith("." + target)]
        if not found:
            available = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
            raise ValueError(f"lora_targets: {target!r} matches no linear layer of {type(model).__name__}; "
                             f"linear layers are named: {', '.join(available)} (or use 'auto')")
        chosen.extend(n for n in found if n not in chosen)
    return chosen


def trainable_modules(model: nn.Module, patterns: tuple[str, ...], lora_targets: list[str]) -> list[str]:
    """Full names of the modules that own a parameter whose name contains one of ``patterns``
    (LongLoRA: "embed", "norm"), in model order: peft trains copies of them (``modules_to_save``).
    A pattern that occurs in no parameter name, a module LoRA also adapts, or a name that peft, which
    matches ``modules_to_save`` by name suffix, would also find in another module is a ValueError."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(pattern in n for n in names):
            raise ValueError(f"trainable: {pattern!r} occurs in no parameter name of {type(model).__name__}; "
                             f"for example: {', '.join(names[:6])}")
    chosen = list(dict.fromkeys(n.rpartition(".")[0] for n in names if any(p in n for p in patterns)))
    adapted = [n for n in chosen if n in lora_targets]
    if adapted:
        raise ValueError(f"trainable: {', '.join(patterns)} selects {adapted[0]}, which LoRA adapts (lora_targets); "
                         "train a module either way, not both")
    others = [f"base_model.model.{m}" for m, _ in model.named_modules() if m not in chosen]  # as peft will see them
    for name in chosen:
        clash = [m.removeprefix("base_model.model.") for m in others if m.endswith(name)]
        if not name or clash:
            raise ValueError(f"trainable: {name or 'the model itself'!r} owns a matching parameter, and peft would also take "
                             f"{(clash or ['every module'])[0]!r} for it (it matches modules by name suffix); use a longer pattern")
    return chosen


def lora_config(config: FinetuneConfig, model: nn.Module, targets: list[str], modules: list[str]) -> Any:
    """peft's LoraConfig: adapters on ``targets``, trained copies of ``modules`` (``modules_to_save``,
    saved in the adapter). Where the model ties its output embeddings to the input ones and the
    input embeddings train, ``ensure_weight_tying`` makes the output layer use the trained copy
    too, as the tied weight did before; peft then adds the output layer's name as ``modules_to_tie``."""
    from peft import LoraConfig

    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    trains_embeddings = any(model.get_submodule(name) is embeddings for name in modules)
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, modules_to_save=modules or None, ensure_weight_tying=tied and trains_embeddings,
                      bias="none", task_type="CAUSAL_LM")


def method_parameters(config: FinetuneConfig, model: nn.Module) -> dict[str, Any]:
    """The position method's parameters for the recipe's target length: the recipe's, plus the
    method's own defaults for that length (``Method.defaults_for``). Checked here (names, types,
    ranges) so that a bad one is a ValueError before the model is touched."""
    from rope_ext.patch import build_method

    cls = registry.get(config.method)
    if cls.kind != "frequency":
        frequency = [n for n in registry.names() if registry.get(n).kind == "frequency"]
        raise ValueError(f"method {config.method!r} changes attention; LongLoRA combines S2-Attn with a frequency "
                         f"method: {', '.join(frequency)}")
    params = cls.defaults_for(main_spec(model_specs(model)), config.target_length, **config.method_params)
    try:
        build_method(config.method, params)
    except TypeError as err:
        raise ValueError(f"method_params: {err}") from None
    return params


def training_pattern(config: FinetuneConfig, model: nn.Module) -> S2Attn | DilatedPattern | None:
    """The attention pattern used in training mode (``rope_ext.patch(..., train_attention=)``): S2-Attn,
    dilated attention with the recipe's pairs (or the dilated method's defaults for target_length),
    or None for full attention."""
    if config.pattern == "s2":
        return S2Attn(group_size_ratio=config.group_size_ratio, shift=config.shift, wrap=config.wrap)
    if config.pattern == "full":
        return None
    pairs = {"segments": config.segments, "dilations": config.dilations}
    if config.segments is None:
        pairs = registry.get("dilated").defaults_for(main_spec(model_specs(model)), config.target_length)
    return dilated_pattern_for(model, pairs["segments"], pairs["dilations"])


def test_method(config: FinetuneConfig, pattern: S2Attn | DilatedPattern | None) -> tuple[str, dict[str, Any]] | None:
    """("dilated", its parameters) when the merged model is to attend as it trained (``test_attention
    dilated``): the training pairs plus the recipe's method_params (method none: e.g. logn); checked
    here. None: the fine-tune's own method, full attention."""
    from rope_ext.patch import build_method

    if config.test_attention != "dilated" or not isinstance(pattern, DilatedPattern):
        return None
    params = {**config.method_params, "segments": pattern.segments, "dilations": pattern.dilations}
    try:
        build_method("dilated", params)
    except TypeError as err:
        raise ValueError(f"test_attention dilated: {err}") from None
    return "dilated", params


def load_base(config: FinetuneConfig) -> tuple[nn.Module, Any]:
    """The model to fine-tune and its tokenizer, plain (no method applied yet)."""
    model, tokenizer = rope_ext.load(config.model, dtype=DTYPES[config.model_dtype], attn_implementation=config.attn_implementation)
    if rope_ext.current(model) is not None:
        raise ValueError(f"{config.model} was saved with rope_ext method {rope_ext.current(model).describe()}; "
                         "fine-tune from the checkpoint it was extended from")
    return model, tokenizer


def _checkpointing(model: nn.Module, enable: bool) -> None:
    """Gradient (activation) checkpointing on or off, non-reentrant (works with frozen inputs),
    under the name transformers 5 prefers when it has it."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def prepare(config: FinetuneConfig, model: nn.Module) -> nn.Module:
    """Check everything, then patch the method with the training pattern, enable gradient
    checkpointing, and wrap in LoRA (or unfreeze everything). Returns the model to train."""
    trained = trained_length(model.config)
    if config.target_length < trained:
        raise ValueError(f"target_length={config.target_length} is below the model's trained length {trained}; "
                         "fine-tuning extends the context, give a longer target_length")
    params = method_parameters(config, model)
    targets = resolve_targets(model, config.lora_targets) if config.lora else []
    modules = trainable_modules(model, config.trainable, targets) if config.lora else []
    pattern = training_pattern(config, model)
    test_method(config, pattern)
    rope_ext.patch(model, config.method, train_attention=pattern, **params)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _checkpointing(model, enable=True)
    if not config.lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    from peft import get_peft_model

    return get_peft_model(model, lora_config(config, model, targets, modules)).train()


def rebuild(config: FinetuneConfig, state_dict: dict[str, torch.Tensor]) -> tuple[nn.Module, Any]:
    """The trained model, prepared as for training and loaded from its full ``state_dict`` (what
    ``accelerator.get_state_dict`` gathered), in eval mode; and its tokenizer."""
    model, tokenizer = load_base(config)
    model = prepare(config, model)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), tokenizer


def save_adapter(model: nn.Module, path: Path) -> Path:
    """Save the peft adapter of a rebuilt model: adapter_config.json (with ``modules_to_save``) and
    adapter_model.safetensors (LoRA weights + the trained embedding / norm copies), plus
    ``rope_ext.json``, the position method the adapter was trained with (the config block
    ``rope_ext.save_pretrained`` writes). To use it: load the base, ``rope_ext.patch(base,
    block["method"], **block["params"])``, then ``peft.PeftModel.from_pretrained(base, path)``."""
    model.save_pretrained(path)
    (Path(path) / RECORD).write_text(json.dumps(model.config.rope_ext, indent=2, sort_keys=True) + "\n")
    return Path(path)


def merge_and_save(model: nn.Module, tokenizer: Any, path: Path, method: tuple[str, dict[str, Any]] | None = None) -> Path:
    """Merge a rebuilt model's LoRA adapters into the base weights (peft ``merge_and_unload``, which
    also puts the trained embedding / norm copies in place) and save a plain checkpoint plus
    tokenizer. Its config carries the method: ``rope_ext.load(path)`` restores it, and so does a plain
    transformers load where the method has a native rope_type (pi, ntk, yarn, llama3, dynamic_ntk).
    With ``method`` (``test_method``: name, parameters) the merged model is saved with that method
    instead of the fine-tune's, so that ``rope_ext.load`` applies it. The model is merged in place:
    save its adapter first."""
    from peft import PeftModel

    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    _checkpointing(merged, enable=False)
    merged.config.use_cache = True
    merged.eval()
    if method is not None:
        rope_ext.unpatch(merged)
        rope_ext.patch(merged, method[0], **method[1])
    rope_ext.save_pretrained(merged, path)
    tokenizer.save_pretrained(path)
    return path
