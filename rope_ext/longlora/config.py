"""The fine-tuning configuration: one frozen dataclass, filled from defaults < a YAML recipe < CLI flags.

Defaults follow LongLoRA (Chen et al. 2023, arXiv 2309.12307, sec. 4.1): Position Interpolation,
S2-Attn with groups of 1/4 of the length (``train_attention``: or LongNet's dilated attention, or
full), LoRA rank 8 / alpha 16 on the attention projections plus trainable embeddings and norms
("LoRA+", sec. 3.3), AdamW at 2e-5 with 20 warm-up steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..validate import MAX_COUNT, MAX_SEED, MAX_WORKERS, integer, number
from ..validate import flag as validated_flag

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("constant_with_warmup", "linear", "cosine", "constant")
TRAIN_ATTENTION = ("s2", "dilated", "full")
TEST_ATTENTION = ("full", "dilated")
BOUNDS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    # every numeric setting's range, checked the same way in a recipe, a flag and the Python API
    "target_length": (integer, {"minimum": 2, "maximum": MAX_COUNT}),
    "group_size_ratio": (number, {"above": 0, "at_most": 1}),
    "lora_rank": (integer, {"minimum": 1, "maximum": 1 << 16}),
    "lora_alpha": (number, {"above": 0, "at_most": 1e6}),
    "lora_dropout": (number, {"at_least": 0, "below": 1}),
    "learning_rate": (number, {"above": 0, "at_most": 1}),
    "weight_decay": (number, {"at_least": 0, "at_most": 1}),
    "warmup_steps": (integer, {"minimum": 0, "maximum": MAX_COUNT}),
    "max_steps": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "batch_size": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "grad_accum": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "max_grad_norm": (number, {"above": 0, "at_most": 1e6}),
    "seed": (integer, {"minimum": 0, "maximum": MAX_SEED}),
    "save_every": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "keep_checkpoints": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "stop_after": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "eval_docs": (integer, {"minimum": 1, "maximum": MAX_COUNT}),
    "sequence_parallel": (integer, {"minimum": 1, "maximum": MAX_WORKERS}),
}
# fields that may differ between a run and its --resume; every other one must match
RESUMABLE = ("resume", "trust_engine_checkpoints", "stop_after", "save_every", "keep_checkpoints", "max_steps", "merge",
             "save_adapter", "evaluate", "eval_corpus", "eval_docs", "test_attention")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a LongLoRA fine-tune needs; every field is also a recipe key and a CLI flag."""

    model: str
    data: tuple[str, ...]
    output_dir: str
    target_length: int
    # position method (a frequency method of the registry) and its extra parameters
    method: str = "pi"
    method_params: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    model_dtype: str = "float32"
    # the attention while training (full attention at inference unless test_attention is dilated):
    # s2 (S2-Attn), dilated (LongNet) or full; None: s2, or full where the older switch s2_attn is false
    train_attention: str | None = None
    s2_attn: bool = True
    group_size_ratio: float = 0.25
    shift: bool = True
    wrap: bool = False
    # LongNet's (segment, dilation) pairs for train_attention dilated (None: the method's geometric
    # defaults from the trained length, w_i = L0 2^i, r_i = 2^i up to target_length)
    segments: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    # the merged model's attention: full, or dilated (saved with the dilated method; method none only)
    test_attention: str = "full"
    # what trains: LoRA on lora_targets ("auto": the linear layers of every attention module) plus
    # copies (peft modules_to_save) of the modules owning a parameter whose name contains one of
    # ``trainable``; lora=False trains everything
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("auto",)
    trainable: tuple[str, ...] = ("embed", "norm")
    # optimisation
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_scheduler: str = "constant_with_warmup"
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"
    seed: int = 42
    # data: files, directories (files with data_extensions), .jsonl (one JSON object per line)
    data_extensions: tuple[str, ...] = (".txt", ".md", ".rst", ".jsonl")
    text_key: str = "text"
    cache_dir: str | None = None
    # checkpoints and the result
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    trust_engine_checkpoints: bool = False
    stop_after: int | None = None
    merge: bool = True
    save_adapter: bool = False
    # after merging: perplexity at the target length (rope_ext.eval.ppl) on eval_corpus's held-out split
    evaluate: bool = False
    eval_corpus: str = "stdlib"
    eval_docs: int = 8
    # DeepSpeed Ulysses: each sequence split over this many processes (sequence_parallel.py)
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        _check_str(self, "model", "output_dir", "method", "attn_implementation", "text_key", "eval_corpus")
        if not self.data or not all(isinstance(p, str) and p for p in self.data):
            raise ValueError(f"data must list at least one file or directory, got {list(self.data)!r}")
        for name, (check, bounds) in BOUNDS.items():
            if not (name == "stop_after" and self.stop_after is None):
                check(getattr(self, name), name, **bounds)
        for name, allowed in (("mixed_precision", MIXED_PRECISION), ("model_dtype", DTYPES), ("lr_scheduler", SCHEDULERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("s2_attn", "shift", "wrap", "lora", "gradient_checkpointing", "resume", "trust_engine_checkpoints",
                     "merge", "save_adapter", "evaluate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_attention(self)
        if not isinstance(self.method_params, dict):
            raise ValueError(f"method_params must be a mapping of parameter names to values, got {self.method_params!r}")
        for name in ("lora_targets", "trainable", "data_extensions"):
            if not all(isinstance(x, str) and x for x in getattr(self, name)):
                raise ValueError(f"{name} must be a list of non-empty names, got {list(getattr(self, name))!r}")
        if self.lora and not self.lora_targets:
            raise ValueError("lora_targets is empty; name the modules LoRA adapts, or 'auto'")
        if self.sequence_parallel > 1:
            from .sequence_parallel import check_length, require_deepspeed

            check_length(self.sequence_parallel, self.target_length)
            require_deepspeed(self.sequence_parallel)
        if self.save_adapter and not self.lora:
            raise ValueError("save_adapter needs lora: a full fine-tune (lora false) has no adapter; its result is the merged "
                             "model (merge)")

    @property
    def pattern(self) -> str:
        """The training attention in effect: ``train_attention``, else s2 (full where s2_attn is false)."""
        return self.train_attention or ("s2" if self.s2_attn else "full")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}


def _pairs(name: str, value: Any) -> tuple[Any, ...] | None:
    """``segments`` / ``dilations`` as a tuple: from a list, or from text "128,256,512" (pieces that are
    not integers kept as given, for the dilated method's own check to name)."""
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, str):
        return tuple(int(x) if x.strip().lstrip("-").isdigit() else x for x in value.split(","))
    if isinstance(value, list):
        return tuple(value)
    raise ValueError(f"{name} must be a list of integers or text such as '128,256,512', got {value!r}")


def _check_attention(config: FinetuneConfig) -> None:
    """train_attention / test_attention and the dilated pairs: allowed values, pairs checked by the
    dilated method itself, refused where they would not be used."""
    if config.train_attention is not None and config.train_attention not in TRAIN_ATTENTION:
        raise ValueError(f"train_attention must be one of {', '.join(TRAIN_ATTENTION)}, got {config.train_attention!r}")
    if config.test_attention not in TEST_ATTENTION:
        raise ValueError(f"test_attention must be one of {', '.join(TEST_ATTENTION)}, got {config.test_attention!r}")
    if config.train_attention == "s2" and not config.s2_attn:
        raise ValueError("s2_attn false contradicts train_attention s2; give train_attention alone (s2, dilated or full)")
    segments, dilations = _pairs("segments", config.segments), _pairs("dilations", config.dilations)
    given = [n for n, v in (("segments", segments), ("dilations", dilations)) if v is not None]
    if config.pattern != "dilated":
        if given:
            raise ValueError(f"{' and '.join(given)} apply to train_attention dilated, not {config.pattern}")
        if config.test_attention == "dilated":
            raise ValueError(f"test_attention dilated needs train_attention dilated (its segments and dilations), not "
                             f"{config.pattern}")
        return
    if len(given) == 1:
        raise ValueError(f"give segments and dilations together (one dilation per segment), got only {given[0]}")
    if given:
        from .dilated_pattern import checked_pairs

        segments, dilations = checked_pairs(segments, dilations)
        object.__setattr__(config, "segments", segments)
        object.__setattr__(config, "dilations", dilations)
    if config.test_attention == "dilated" and config.method != "none":
        raise ValueError(f"test_attention dilated needs method none: a model carries one rope_ext method, and dilated "
                         f"attention rotates with plain RoPE, so it cannot keep {config.method!r}'s frequencies; use "
                         f"test_attention full, or method none")
    if config.sequence_parallel > 1:
        raise ValueError(f"train_attention dilated does not run with sequence_parallel={config.sequence_parallel}: each "
                         "head keeps the rows equal to its index modulo the dilation, and a Ulysses process holds only "
                         "some heads; use train_attention s2 or full, or sequence_parallel 1")


def _check_str(config: FinetuneConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")


HELP = {
    "model": "checkpoint directory, .gguf file or alias (smollm2) to fine-tune",
    "data": "text files, directories (files ending in data_extensions) or .jsonl files",
    "output_dir": "where checkpoints, train_log.jsonl, the merged model (model/) and the adapter (adapter/) go",
    "target_length": "tokens per training sequence = the context to extend to (>= the trained length)",
    "method": "frequency method of rope_ext (pi, ntk, yarn, llama3, ...)",
    "attn_implementation": "the model's attention (sdpa, eager, flash_attention_2 ...)",
    "model_dtype": "dtype of the loaded weights",
    "train_attention": f"attention while training: {', '.join(TRAIN_ATTENTION)} (default s2; full where --no-s2-attn)",
    "s2_attn": "shifted sparse attention while training (the older switch; --train-attention takes precedence)",
    "group_size_ratio": "S2-Attn group size as a fraction of target_length",
    "shift": "shift half of the heads by half a group",
    "wrap": "the reference's roll: the first half-group of shifted heads attends to the last",
    "segments": "LongNet segment lengths for --train-attention dilated, e.g. 2048,4096,8192 (default: the trained "
                "length doubled up to target_length)",
    "dilations": "LongNet dilations, one per segment, e.g. 1,2,4 (give with --segments)",
    "test_attention": f"the merged model's attention: {', '.join(TEST_ATTENTION)} (dilated: saved with the dilated "
                      "method; needs --train-attention dilated and --method none)",
    "lora": "LoRA (else: full fine-tuning)",
    "lora_targets": "linear layers LoRA adapts ('auto': every attention projection)",
    "trainable": "also train (peft modules_to_save) the modules whose parameter names contain these (LongLoRA: embed norm)",
    "lr_scheduler": ", ".join(SCHEDULERS),
    "batch_size": "sequences per process per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "gradient_checkpointing": "recompute activations in the backward pass (saves memory)",
    "mixed_precision": "auto (bf16 / fp16 on a GPU, none on CPU), no, bf16, fp16",
    "text_key": "field holding the text in .jsonl files",
    "cache_dir": "token cache (default: $ROPE_EXT_CACHE/tokens or ~/.cache/rope_ext/tokens)",
    "save_every": "checkpoint interval in optimizer steps",
    "keep_checkpoints": "checkpoints kept (older ones are deleted)",
    "resume": "continue the run in output_dir from its last checkpoint",
    "trust_engine_checkpoints": "resume an FSDP / DeepSpeed run although its engine reads its files with pickle "
                                "(only for directories your own runs wrote; SECURITY.md)",
    "stop_after": "stop (with a checkpoint) after this many steps in this invocation; continue with --resume",
    "merge": "merge LoRA into the weights and save output_dir/model at the end",
    "save_adapter": "save the peft adapter (LoRA + trained embed / norm copies) in output_dir/adapter at the end",
    "evaluate": "perplexity of the merged model at target_length (rope_ext.eval)",
    "eval_corpus": "held-out text for --evaluate: 'stdlib', a directory, .jsonl or text file",
    "eval_docs": "windows evaluated by --evaluate",
    "sequence_parallel": "split each sequence over this many processes (DeepSpeed Ulysses; needs `pip install deepspeed`, "
                         "heads and target_length divisible by it, --num-processes a multiple of it)",
}

FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
REQUIRED = [n for n, f in FIELDS.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
HINTS = typing.get_type_hints(FinetuneConfig)


def _is_sequence(name: str) -> bool:
    return typing.get_origin(HINTS[name]) is tuple


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` (plain data only: a ``!!python/...`` tag is never constructed, let alone
    run); malformed or tagged YAML is a ValueError naming ``where`` and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where} is not plain YAML: {problem}{place} (recipes hold mappings, lists, strings, numbers and "
                         "booleans; tags such as !!python/... are refused, never run)") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe; unknown keys are an error that lists the allowed ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe {path} is not UTF-8 text ({err})") from None
    recipe = safe_yaml(text, f"recipe {path}")
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of keys to values, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(FIELDS))
    if unknown:
        raise ValueError(f"recipe {path}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: {', '.join(FIELDS)}")
    return recipe


def build_config(recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """FinetuneConfig from defaults, then ``recipe``, then ``overrides`` (CLI flags; None = not given)."""
    values: dict[str, Any] = {}
    for source in (recipe or {}, overrides or {}):
        unknown = sorted(set(source) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
        given = {k: v for k, v in source.items() if v is not None}
        if given.get("s2_attn") is True and given.get("train_attention", "s2") != "s2":
            raise ValueError(f"s2_attn true contradicts train_attention {given['train_attention']}; give train_attention alone "
                             "(s2, dilated or full)")
        for name, other in (("train_attention", "s2_attn"), ("s2_attn", "train_attention")):
            if name in given and other not in given:
                values.pop(other, None)  # a later source's choice of training attention replaces an earlier one's
        values.update(given)
    missing = [name for name in REQUIRED if name not in values]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join(missing)} (give them in the recipe or as --{missing[0].replace('_', '-')} ...)")
    for name, value in list(values.items()):
        if _is_sequence(name):
            values[name] = tuple([value] if isinstance(value, str) else value)
        elif name in BOUNDS and BOUNDS[name][0] is number and isinstance(value, str):
            values[name] = _float(name, value)  # YAML 1.1 reads 2e-5 (no dot) as a string
    return FinetuneConfig(**values)


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--recipe`` plus one flag per config field (``--target-length``, ``--no-s2-attn`` ...)."""
    parser.add_argument("--recipe", help="YAML recipe (see recipes/); flags override its values")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        hint = HINTS[name]
        default = "" if f.default is dataclasses.MISSING else f" (default: {_show(f.default)})"
        text = HELP.get(name, name.replace("_", " "))
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text}{default}")
        elif name in ("train_attention", "test_attention"):
            choices = TRAIN_ATTENTION if name == "train_attention" else TEST_ATTENTION
            parser.add_argument(flag, choices=choices, default=None, help=text if f.default is None else f"{text}{default}")
        elif name in ("segments", "dilations"):
            parser.add_argument(flag, default=None, metavar="N,N,...", help=text)
        elif name == "method_params":
            parser.add_argument("--method-param", dest=name, action="append", metavar="KEY=VALUE",
                                help="a parameter of the position method, e.g. beta_fast=32 (repeatable)")
        elif _is_sequence(name):
            parser.add_argument(flag, nargs="+", default=None, metavar=name.upper(), help=f"{text}{default}")
        elif name in BOUNDS:
            check, bounds = BOUNDS[name]
            parser.add_argument(flag, type=validated_flag(check, **bounds), default=None, help=f"{text}{default}")
        else:
            parser.add_argument(flag, default=None, help=f"{text}{default}")


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """FinetuneConfig from parsed flags (and the recipe they name)."""
    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    if overrides["method_params"] is not None:
        params = dict(recipe.get("method_params") or {})
        for item in overrides["method_params"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--method-param takes KEY=VALUE, got {item!r}")
            params[key] = safe_yaml(value, f"--method-param {item!r}")
        overrides["method_params"] = params
    return build_config(recipe, overrides)
