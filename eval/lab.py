"""The train-short lab: small Llama-architecture byte-level models trained from scratch at a short
context, so that every method can be measured at 16x and more of the trained length in minutes.

``pretrain(LabConfig(...), out)`` trains on the offline corpus (train split) and saves a normal HF
checkpoint (``save_pretrained``, safetensors) with the byte tokenizer; the trained length is the
config's ``max_position_embeddings``. The position encoding is a choice: RoPE with any base, ALiBi or
NoPE (trained through ``rope_ext.patch(model, "alibi" | "nope")``; the saved config carries the
``rope_ext`` block that ``rope_ext.load`` re-applies), or a train-time encoding of
``rope_ext.eval.encodings`` with its ``pe_params`` (installed on the fresh model; ``load_lab``
rebuilds the model from lab.json, installs it again and loads the weights strictly). ``lab.json``
beside the weights records how it was trained (written last: a directory without it is an unfinished run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import rope_ext
from rope_ext.validate import MAX_ALIBI_BIAS, MAX_BASE, MAX_COUNT, MAX_SEED, integer, number

from . import encodings
from .corpus import load_corpus
from .tokens import byte_tokenizer, encode, is_byte_tokenizer

POSITIONS = ("rope", "alibi", "nope")
LAB_FILE = "lab.json"
ENCODING_ATTRIBUTE = "lab_encoding"  # the Encoding installed on a lab model (build_model)


@dataclass(frozen=True)
class LabConfig:
    """A lab language model and how to train it (defaults: the reference model of the demo)."""

    context: int = 128
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    position: str = "rope"
    rope_theta: float = 10000.0
    max_bias: float = 8.0
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    corpus: str = "stdlib"
    pe_params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs of the encoding ``position`` names

    def __post_init__(self) -> None:
        if self.position not in positions():
            raise ValueError(f"position must be one of {', '.join(positions())}, got {self.position!r}")
        if not isinstance(self.pe_params, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                             for p in self.pe_params):
            raise ValueError(f"pe_params must be a tuple of (name, value) pairs, got {self.pe_params!r}")
        names = [name for name, _ in self.pe_params]
        if len(set(names)) < len(names):
            raise ValueError(f"pe_params names a parameter twice: {names}")
        if self.position in POSITIONS and self.pe_params:
            raise ValueError(f"pe_params {dict(self.pe_params)} are for the encodings {', '.join(encodings.names())}; "
                             f"position {self.position!r} takes none (use rope_theta / max_bias)")
        if self.position not in POSITIONS:
            encodings.build(self.position, dict(self.pe_params))
        for name in ("layers", "hidden", "heads", "intermediate", "steps", "batch", "warmup"):
            integer(getattr(self, name), name, minimum=0 if name == "warmup" else 1, maximum=MAX_COUNT)
        integer(self.context, "context", minimum=8, maximum=MAX_COUNT)
        integer(self.seed, "seed", minimum=0, maximum=MAX_SEED)
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden ({self.hidden}) must split into {self.heads} heads of even size")
        number(self.lr, "lr", above=0, at_most=1)
        number(self.weight_decay, "weight_decay", at_least=0, at_most=1)
        number(self.rope_theta, "rope_theta", above=1, at_most=MAX_BASE)
        number(self.max_bias, "max_bias", above=0, at_most=MAX_ALIBI_BIAS)

    def key(self) -> str:
        """A short stable id of this configuration (the cache directory name)."""
        fields = dataclasses.asdict(self)
        if not self.pe_params:
            del fields["pe_params"]  # keys of configs from before pe_params existed stay as they were
        blob = json.dumps(fields, sort_keys=True)
        return f"lm-{self.position}-T{self.context}-s{self.seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def positions() -> tuple[str, ...]:
    """Every value ``LabConfig.position`` accepts: rope, alibi, nope and the registered encodings."""
    return POSITIONS + tuple(encodings.names())


def build_model(cfg: LabConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM for ``cfg`` (patched with ALiBi / NoPE, or with the
    encoding ``cfg.position`` installed, when asked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    if cfg.position == "alibi":
        rope_ext.patch(model, "alibi", max_bias=float(cfg.max_bias))
    elif cfg.position == "nope":
        rope_ext.patch(model, "nope")
    elif cfg.position != "rope":
        encoding = encodings.build(cfg.position, dict(cfg.pe_params))
        encoding.install(model)
        setattr(model, ENCODING_ATTRIBUTE, encoding)
    return model


def trained_encoding(model: torch.nn.Module) -> encodings.Encoding | None:
    """The train-time encoding a lab model was built with (``build_model`` / ``load_lab``), or None."""
    return getattr(model, ENCODING_ATTRIBUTE, None)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def random_windows(ids: torch.Tensor, length: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless (batch, length) windows at uniform random offsets of the token stream ``ids``."""
    if ids.numel() <= length:
        raise ValueError(f"the training corpus has {ids.numel()} tokens; need more than the context {length}")
    while True:
        starts = torch.randint(0, ids.numel() - length, (batch,), generator=generator)
        yield torch.stack([ids[s:s + length] for s in starts.tolist()])


def train_loop(model: torch.nn.Module, batches: Iterator[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
               steps: int, lr: float, warmup: int, weight_decay: float, desc: str) -> list[float]:
    """AdamW with warm-up + cosine; returns the loss of every step."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_fn(model, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {float(loss.detach())} at step {step + 1} of {steps} (learning rate "
                                     f"{group['lr']:.3g}); training stopped and nothing was saved: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def save_lab(model: torch.nn.Module, tokenizer: Any, out: Path, record: dict) -> Path:
    """Save weights (safetensors), tokenizer, and ``lab.json`` last (it marks the checkpoint complete)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / LAB_FILE).unlink(missing_ok=True)
    if rope_ext.current(model) is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rope_ext.save_pretrained(model, out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / LAB_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def is_complete(path: str | Path) -> bool:
    return (Path(path) / LAB_FILE).is_file()


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def pretrain(cfg: LabConfig, out: str | Path) -> Path:
    """Train a lab LM from scratch per ``cfg`` and save it to ``out``; returns the path."""
    out = Path(out)
    tokenizer = byte_tokenizer()
    corpus = load_corpus(cfg.corpus, split="train")
    ids = encode(tokenizer, corpus.text())
    model = build_model(cfg, len(tokenizer))
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    losses = train_loop(model, random_windows(ids, cfg.context, cfg.batch, generator), lm_loss, cfg.steps, cfg.lr,
                        cfg.warmup, cfg.weight_decay, desc=f"pretrain {cfg.position} T={cfg.context} seed={cfg.seed}")
    record = {"kind": "lm", "config": dataclasses.asdict(cfg), "trained_length": cfg.context,
              "corpus": corpus.describe(), "final_loss": sum(losses[-20:]) / len(losses[-20:]),
              "loss_curve": losses[:: max(1, len(losses) // 50)], "train_seconds": round(time.time() - start, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    return save_lab(model, tokenizer, out, record)


def cached_pretrain(cfg: LabConfig, cache: str | Path) -> Path:
    """The checkpoint for ``cfg`` under ``cache`` (trained now if it is not there or incomplete).
    One cached before the lab's tokenizer stopped appending EOS gets that tokenizer's files (the
    same ids, so the weights and the cache key stay as they are)."""
    path = Path(cache).expanduser() / cfg.key()
    if not is_complete(path):
        return pretrain(cfg, path)
    if _saved_byt5(path):
        byte_tokenizer().save_pretrained(path)
    return path


def _saved_byt5(path: Path) -> bool:
    """Whether the checkpoint's tokenizer is transformers' ByT5Tokenizer, which appends EOS to every
    ``tok(text)`` (lab checkpoints saved before ``byte_tokenizer`` was a plain fast tokenizer)."""
    config = path / "tokenizer_config.json"
    return config.is_file() and json.loads(config.read_text()).get("tokenizer_class") == "ByT5Tokenizer"


def _lm_fields(path: Path) -> dict[str, Any] | None:
    """lab.json's LabConfig fields of the LM a finished checkpoint was trained as: ``config`` (an LM) or
    ``lm_config`` (a passkey fine-tune); None when it records neither (a passkey checkpoint saved
    before ``lm_config``)."""
    record = json.loads((path / LAB_FILE).read_text())
    return record.get("config") if record.get("kind") == "lm" else record.get("lm_config")


def lab_config(path: str | Path) -> LabConfig | None:
    """The LabConfig of the LM a finished checkpoint was trained as (see ``_lm_fields``), or None."""
    fields = _lm_fields(Path(path))
    if fields is None:
        return None
    return LabConfig(**{**fields, "pe_params": tuple((name, _frozen(value)) for name, value in fields.get("pe_params", ()))})


def _frozen(value: Any) -> Any:
    """A JSON value with its lists made tuples (pe_params stay hashable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load ``file`` (safetensors) into ``model`` strictly: a key missing (other than a tied alias of
    a saved one, such as lm_head of tied embeddings) or unexpected is a ValueError naming them."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"lab checkpoint weights {str(file)!r} not found")
    saved = load_file(file)
    state = model.state_dict()
    stored = {state[k].data_ptr() for k in saved if k in state}
    missing = sorted(k for k in state if k not in saved and state[k].data_ptr() not in stored)
    unexpected = sorted(set(saved) - set(state))
    if missing or unexpected:
        raise ValueError(f"{str(file)!r} does not match the lab model its lab.json describes: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    model.load_state_dict(saved, strict=False)


def load_lab(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a lab checkpoint. RoPE / ALiBi / NoPE through ``rope_ext.load`` (which
    restores ALiBi / NoPE); a train-time encoding by rebuilding the model from config.json + lab.json,
    installing the encoding and loading model.safetensors strictly. A checkpoint saved with
    ByT5Tokenizer gets ``byte_tokenizer()`` instead: the same ids, no EOS appended to a prompt."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"lab checkpoint {str(path)!r} not found")
    fields = _lm_fields(path) if is_complete(path) else None
    if fields is None or fields.get("position", "rope") in POSITIONS:
        model, tokenizer = rope_ext.load(path, dtype=dtype)
    else:
        cfg = lab_config(path)
        vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg, vocab_size)
        load_weights(model, path / "model.safetensors")
        model = model.to(dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if _saved_byt5(path) and is_byte_tokenizer(tokenizer):
        tokenizer = byte_tokenizer()
    return model, tokenizer


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for the harness: a finished lab checkpoint (lab.json) through ``load_lab``, so a
    train-time encoding is rebuilt with its learned weights; anything else through ``rope_ext.load``."""
    if Path(name_or_path).is_dir() and is_complete(name_or_path):
        if attn_implementation != "sdpa":
            raise ValueError(f"attn_implementation={attn_implementation!r}: a lab checkpoint runs with its own attention "
                             "(sdpa, or its position encoding's); leave attn_implementation out")
        return load_lab(name_or_path, dtype=dtype)
    return rope_ext.load(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
