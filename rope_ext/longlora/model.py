"""The model side of a LongLoRA fine-tune: load, check, patch (method + S2-Attn), wrap in LoRA, and
at the end merge the adapters back and save a checkpoint that ``rope_ext.load`` restores.

LongLoRA's "LoRA+" (Chen et al. 2023, arXiv 2309.12307, sec. 3.3, Table 2): low-rank adapters on
the attention projections alone do not adapt a model to a longer context; making the embeddings
and normalisation layers trainable as well closes the gap to full fine-tuning at a small cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import rope_ext
from rope_ext.facts import main_spec, model_specs, trained_length
from rope_ext.methods import registry

from .config import FinetuneConfig
from .s2attn import S2Attn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def check_trainable(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Every pattern of ``trainable`` must occur in some parameter name."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(pattern in n for n in names):
            raise ValueError(f"trainable: {pattern!r} occurs in no parameter name of {type(model).__name__}; "
                             f"for example: {', '.join(names[:6])}")


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
    """Check everything, then patch the method with S2-Attn for training, enable gradient
    checkpointing, and wrap in LoRA (or unfreeze everything). Returns the model to train."""
    trained = trained_length(model.config)
    if config.target_length < trained:
        raise ValueError(f"target_length={config.target_length} is below the model's trained length {trained}; "
                         "fine-tuning extends the context, give a longer target_length")
    params = method_parameters(config, model)
    targets = resolve_targets(model, config.lora_targets) if config.lora else []
    if config.lora:
        check_trainable(model, config.trainable)
    pattern = S2Attn(group_size_ratio=config.group_size_ratio, shift=config.shift, wrap=config.wrap) if config.s2_attn else None
    rope_ext.patch(model, config.method, train_attention=pattern, **params)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _checkpointing(model, enable=True)
    if not config.lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if any(pattern in name for pattern in config.trainable) and "lora_" not in name:
            p.requires_grad_(True)
    return model.train()


def merge_and_save(config: FinetuneConfig, state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Rebuild the trained model from its full ``state_dict``, merge the LoRA adapters into the
    base weights (peft ``merge_and_unload``) and save a plain checkpoint plus tokenizer. Its config
    carries the method: ``rope_ext.load(path)`` restores it, and so does a plain transformers load
    where the method has a native rope_type (pi, ntk, yarn, llama3, dynamic_ntk)."""
    model, tokenizer = load_base(config)
    model = prepare(config, model)
    model.load_state_dict(state_dict, strict=True)
    merged = model.merge_and_unload() if config.lora else model
    _checkpointing(merged, enable=False)
    merged.config.use_cache = True
    merged.eval()
    rope_ext.save_pretrained(merged, path)
    tokenizer.save_pretrained(path)
    return path
