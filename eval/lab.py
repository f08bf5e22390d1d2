"""The train-short lab: small Llama-architecture byte-level models trained from scratch at a short
context, so that every method can be measured at 16x and more of the trained length in minutes.

``pretrain(LabConfig(...), out)`` trains on the offline corpus (train split) and saves a normal HF
checkpoint (``save_pretrained``, safetensors) with the byte tokenizer; the trained length is the
config's ``max_position_embeddings``. The position encoding is a choice: RoPE with any base, ALiBi or
NoPE; the last two are trained through ``rope_ext.patch(model, "alibi" | "nope")`` and the saved
config carries the ``rope_ext`` block that ``rope_ext.load`` re-applies. ``lab.json`` beside the
weights records how it was trained (written last: a directory without it is an unfinished run).
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

from .corpus import load_corpus
from .tokens import byte_tokenizer, encode, is_byte_tokenizer

POSITIONS = ("rope", "alibi", "nope")
LAB_FILE = "lab.json"


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

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
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
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"lm-{self.position}-T{self.context}-s{self.seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def build_model(cfg: LabConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM for ``cfg`` (patched with ALiBi / NoPE when asked)."""
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
    return model


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


def load_lab(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a lab checkpoint, through ``rope_ext.load`` (which restores ALiBi / NoPE).
    A checkpoint saved with ByT5Tokenizer gets ``byte_tokenizer()`` instead: the same ids, no EOS
    appended to a prompt."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"lab checkpoint {str(path)!r} not found")
    model, tokenizer = rope_ext.load(path)
    if _saved_byt5(path) and is_byte_tokenizer(tokenizer):
        tokenizer = byte_tokenizer()
    return model, tokenizer
