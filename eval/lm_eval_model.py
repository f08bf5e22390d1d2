"""lm-eval model type ``rope_ext``: lm-eval's HF model (HFLM) with ``rope_ext.patch`` applied.

``import rope_ext.eval`` registers the name with lm-eval (``rope_ext.eval.lm_eval_tasks.register``);
lm-eval imports this module when the model is first asked for. lm-eval 0.4.13 loads no plugins, so its
own ``lm_eval`` command does not know the name; run it through ``python -m rope_ext.eval.lm_eval_cli``
(or ``rope-ext lm-eval``).

model_args (``--model_args pretrained=PATH,method=yarn,factor=4,max_length=2048``):
  * ``pretrained``: a local checkpoint directory, a ``.gguf`` file, or ``smollm2`` (the shipped GGUF);
    loaded offline with ``rope_ext.load`` (a saved ALiBi / NoPE lab model comes back as trained);
  * ``method``: any name in ``rope_ext.methods.REGISTRY`` (default "none": the model as loaded);
  * the method's own parameters (factor, target_length, window, k, group_size, logn, beta_fast,
    attention_factor, ...): every model_arg that is not an HFLM argument is handed to
    ``rope_ext.patch``, which rejects unknown ones naming the allowed ones;
  * ``max_length``: the longest context lm-eval feeds the model. Default: ``target_length``, else
    ``factor`` x the trained length, else the trained length (then nothing runs past it).
    Unset window / scale parameters are filled in for ``max_length`` as ``rope_ext.eval.spec``
    does for ``rope-ext eval`` (factor = max_length / trained length, window = trained length // 2);
  * HFLM's ``batch_size``, ``max_batch_size``, ``device`` (default cuda if available, else cpu),
    ``dtype`` (default float32), ``truncation``, ``logits_cache``, ``add_bos_token`` (default False:
    no special tokens are added, as in rope_ext's own harness), ``prefix_token_id``,
    ``softmax_dtype``, ``mixed_precision_dtype``, ``think_end_token``, ``enable_thinking``,
    ``chat_template_args``; ``attn_implementation`` (default sdpa); ``rope_ext.patch``'s ``kernel``.
Numbers and booleans given as strings ("4", "0.5", "true") are parsed.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import rope_ext
from rope_ext.facts import rope_spec
from rope_ext.methods import registry

from .lab import load_model
from .lm_eval_tasks import MODEL_NAME
from .runner import loaded_method
from .spec import parse_value, resolve, trained_length

HFLM_ARGS = ("batch_size", "max_batch_size", "truncation", "logits_cache", "add_bos_token", "prefix_token_id",
             "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking", "chat_template_args")
LOAD_ARGS = ("dtype", "attn_implementation")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Arguments of HFLM that only make sense when HFLM loads the model itself; rope_ext loads it.
UNSUPPORTED = ("backend", "revision", "subfolder", "tokenizer", "trust_remote_code", "use_fast_tokenizer",
               "parallelize", "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan", "peft",
               "delta", "autogptq", "gptqmodel", "gguf_file")


def parse_arg(value: Any) -> Any:
    """A model_arg as given on the command line -> bool / int / float / str (other types unchanged)."""
    return parse_value(value) if isinstance(value, str) else value


def implied_length(params: dict[str, Any], trained: int) -> int:
    """The context a method's parameters aim at: target_length, else factor x trained, else trained."""
    if isinstance(params.get("target_length"), (int, float)) and not isinstance(params["target_length"], bool):
        return max(trained, int(params["target_length"]))
    factor = params.get("factor")
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0:
        return max(trained, round(factor * trained))
    return trained


def torch_dtype(name: Any) -> Any:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name if name == "auto" else getattr(torch, name)


def pick_device(device: str | None) -> torch.device:
    """``device``; CUDA when none is given and one is available, else CPU. A CUDA device on a machine
    without one falls back to CPU with a warning, as HFLM does (lm-eval's CLI asks for cuda:0 by default)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s asked for, but no CUDA device is available: using cpu", device)
        return torch.device("cpu")
    return chosen


def apply_method(model: torch.nn.Module, method: str, params: dict[str, Any]) -> None:
    """``rope_ext.patch`` with lm-eval's conventions: "none" without parameters leaves the model as
    loaded; a model loaded with its own position encoding (ALiBi / NoPE) takes no other method."""
    native = loaded_method(model)
    if method == "none" and not params:
        return
    if native is not None:
        raise ValueError(f"this model was trained with {native}; only method=none (the model as loaded) applies to it, not {method!r}")
    try:
        rope_ext.patch(model, method, **params)
    except TypeError as err:
        raise ValueError(str(err)) from None


class _DropPreloadedWarnings(logging.Filter):
    """HFLM warns that a pre-initialised model skips its loading options: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "not of type `str`" not in text and "already-initialized model" not in text


@register_model(MODEL_NAME)
class RopeExtLM(HFLM):
    """HFLM over a model loaded by ``rope_ext.load`` and patched with ``rope_ext.patch``."""

    def __init__(self, pretrained: str, method: str = "none", max_length: int | str | None = None,
                 device: str | None = None, **kwargs: Any) -> None:
        args = {k: parse_arg(v) for k, v in kwargs.items()}
        unsupported = sorted(set(args) & set(UNSUPPORTED))
        if unsupported:
            raise ValueError(f"model_args {', '.join(unsupported)} are not supported by --model {MODEL_NAME} (rope_ext loads the "
                             f"model itself, offline); supported besides the method's parameters: pretrained, method, max_length, "
                             f"device, {', '.join(HFLM_ARGS + LOAD_ARGS)}")
        hf_args = {k: args.pop(k) for k in HFLM_ARGS if k in args}
        hf_args.setdefault("add_bos_token", False)
        load_args = {"dtype": torch_dtype(args.pop("dtype", "float32")), "attn_implementation": args.pop("attn_implementation", "sdpa")}
        method = str(method)
        registry.get(method)
        max_length = parse_arg(max_length)
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 (tokens), got {max_length!r}")
        chosen = pick_device(None if device is None else str(device))

        model, tokenizer = load_model(str(pretrained), **load_args)
        trained = trained_length(model.config)
        self.trained_length = trained
        max_length = implied_length(args, trained) if max_length is None else max_length
        params = resolve(method, args, max_length, rope_spec(model))
        apply_method(model, method, params)
        self.rope_ext_method, self.rope_ext_params = method, params
        model.to(chosen)

        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        quiet = _DropPreloadedWarnings()
        hf_logger.addFilter(quiet)
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, max_length=max_length, **hf_args)
        finally:
            hf_logger.removeFilter(quiet)
        self.pretrained = str(pretrained)

    def get_model_info(self) -> dict[str, Any]:
        """What was evaluated (no hub look-up: HFLM's version asks the Hub for a commit hash)."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "pretrained": self.pretrained,
                "rope_ext_method": self.rope_ext_method, "rope_ext_params": dict(self.rope_ext_params),
                "trained_length": self.trained_length, "max_length": self.max_length}
