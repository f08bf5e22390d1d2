"""The lab passkey model: a lab LM warm-started and fine-tuned on the compact passkey format.

From scratch, a tiny byte-level model stays at chance on passkey retrieval; warm-started from the lab
LM and fine-tuned on ``... pass key #NNNNN. ... What is the pass key? #NNNNN`` windows of the trained
length (filler: the corpus' train split, key at a uniform random depth), with loss = LM loss + the
answer digits' loss (weighted by ``answer_weight``), it learns to retrieve within its window in a few
minutes (800 steps of 32 x 128 bytes; training exact match passes 99% near step 450, the
later steps make retrieval past the window under ReRoPE reliable). Evaluated
past the window, it shows what each method keeps of long-range retrieval.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .lab import is_complete, lab_config, load_lab, save_lab, train_loop
from .passkey import FORMATS, build_prompt, filler_stream
from .spec import trained_length


@dataclass(frozen=True)
class PasskeyLabConfig:
    steps: int = 800
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    answer_weight: float = 3.0
    multi_key_fraction: float = 0.0
    seed: int = 0
    corpus: str = "stdlib"

    def __post_init__(self) -> None:
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0 or self.answer_weight < 0 or not 0 <= self.multi_key_fraction <= 1:
            raise ValueError("lr must be > 0, answer_weight >= 0 and multi_key_fraction in [0, 1]")

    def key(self, init: str | Path) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "init": Path(init).name}, sort_keys=True)
        return f"passkey-s{self.seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def passkey_batches(tokenizer, length: int, cfg: PasskeyLabConfig) -> Iterator[tuple[torch.Tensor, int]]:
    """Endless (ids (batch, length), answer length) batches of compact passkey windows."""
    fmt = FORMATS["compact"]
    filler = filler_stream(tokenizer, fmt, cfg.corpus, "train", 2 * length)
    rng = random.Random(f"passkey-train:{cfg.seed}")
    while True:
        rows, answer_len = [], 0
        for _ in range(cfg.batch):
            n_keys = 2 if rng.random() < cfg.multi_key_fraction else 1
            prompt, _, answer = build_prompt(tokenizer, fmt, filler, length, rng.random(), rng, n_keys)
            rows.append(torch.cat([prompt, answer]))
            answer_len = answer.numel()
        yield torch.stack(rows), answer_len


def passkey_loss(answer_weight: float, stats: dict):
    """LM loss over the window + ``answer_weight`` x the loss of the answer digits (the last tokens)."""

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        ids, n = batch
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        answer = per_token[:, -n:]
        with torch.no_grad():
            hits = logits[:, -n:].argmax(-1) == targets[:, -n:]
            stats.setdefault("exact", []).append(float(hits.all(-1).float().mean()))
            stats.setdefault("digits", []).append(float(hits.float().mean()))
        return per_token.mean() + answer_weight * answer.mean()

    return loss_fn


def finetune_passkey(init: str | Path, cfg: PasskeyLabConfig, out: str | Path) -> Path:
    """Fine-tune the lab LM at ``init`` on compact passkey windows of its trained length; save to ``out``
    (lab.json's ``lm_config``: the LM's LabConfig, so that ``load_lab`` rebuilds its position encoding)."""
    lm = lab_config(init) if is_complete(init) else None
    model, tokenizer = load_lab(init)
    length = trained_length(model.config)
    stats: dict = {}
    torch.manual_seed(cfg.seed)
    start = time.time()
    losses = train_loop(model, passkey_batches(tokenizer, length, cfg), passkey_loss(cfg.answer_weight, stats),
                        cfg.steps, cfg.lr, cfg.warmup, cfg.weight_decay, desc=f"passkey fine-tune T={length} seed={cfg.seed}")
    exact = stats.get("exact", [0.0])
    record = {"kind": "passkey", "config": dataclasses.asdict(cfg), "init": str(init), "trained_length": length,
              "final_loss": sum(losses[-20:]) / len(losses[-20:]), "train_exact_last20": sum(exact[-20:]) / len(exact[-20:]),
              "train_seconds": round(time.time() - start, 1), "threads": torch.get_num_threads()}
    if lm is not None:
        record["lm_config"] = dataclasses.asdict(lm)
    return save_lab(model, tokenizer, Path(out), record)


def cached_finetune_passkey(init: str | Path, cfg: PasskeyLabConfig, cache: str | Path) -> Path:
    path = Path(cache).expanduser() / cfg.key(init)
    return path if is_complete(path) else finetune_passkey(init, cfg, path)
