"""The LongLoRA fine-tune loop (Chen et al. 2023, arXiv 2309.12307): S2-Attn + LoRA+ with any
frequency method, on one process or many through accelerate.

    python -m rope_ext.longlora.train --recipe recipes/lab-128-to-512.yaml --model lab/ --data corpus/
    accelerate launch --cpu --num_processes 2 -m rope_ext.longlora.train --recipe ... # DDP
    rope-ext finetune --recipe ... --num-processes 2                                 # the same

Every setting is checked, the data tokenised (cached) and the model built before the first step;
checkpoints every ``save_every`` steps; ``--resume`` continues the same run with the same data order
and loss trajectory; at the end the LoRA adapters are merged and a normal checkpoint is saved in
``<output_dir>/model``. Losses go to ``<output_dir>/train_log.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import FinetuneConfig, add_arguments, config_from_args
from .data import (
    PackedSequences,
    SampleOrder,
    batch_numbers,
    collect_files,
    load_tokens,
)
from .model import load_base, merge_and_save, prepare

LOG = "train_log.jsonl"


def resolve_mixed_precision(choice: str) -> str:
    """"auto": bf16 on a GPU that has it, else fp16 on a GPU, else none (CPU)."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _truncate_log(path: Path, step: int) -> None:
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train(config: FinetuneConfig) -> Path | None:
    """Run (or resume) the fine-tune; returns the merged model's directory, or None when the run
    stopped early (``stop_after``) or ``merge`` is off."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision), gradient_accumulation_steps=config.grad_accum)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    out = Path(config.output_dir)
    files = collect_files(config.data, config.data_extensions)
    if config.evaluate and config.eval_corpus != "stdlib" and not Path(config.eval_corpus).exists():
        raise FileNotFoundError(f"eval_corpus {config.eval_corpus!r} not found: give 'stdlib', a directory, a .jsonl or a text file")
    done = ckpt.complete_checkpoints(out)
    if config.resume:
        if not done:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
        ckpt.check_resume(out, config, world)
    elif done:
        raise ValueError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or choose another output_dir")

    set_seed(config.seed)
    model, tokenizer = load_base(config)
    model = prepare(config, model)
    with accelerator.main_process_first():
        ids, _ = load_tokens(tokenizer, files, config.text_key, config.cache_dir, show_progress=main)
    data = PackedSequences(ids, config.target_length)
    order = SampleOrder(len(data), config.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED) and config.lora:
        ckpt.keep_trainable_only(accelerator)

    start = 0
    if config.resume:
        start, path = done[-1]
        accelerator.load_state(str(path))
        if main:
            _truncate_log(out / LOG, start)
    elif main:
        ckpt.write_run_config(out, config, world)
        (out / LOG).unlink(missing_ok=True)
    end = min(config.max_steps, start + config.stop_after) if config.stop_after else config.max_steps
    tokens_per_step = config.batch_size * config.grad_accum * world * config.target_length
    if main:
        print(f"fine-tuning {config.model} to {config.target_length} tokens: {len(data)} sequences, {world} process(es), "
              f"{sum(p.numel() for p in params):,} trainable parameters, steps {start}..{end} of {config.max_steps}", file=sys.stderr)

    model.train()
    bar = tqdm(total=config.max_steps, initial=start, desc="fine-tuning", unit="step", disable=not main)
    for step in range(start, end):
        began = time.perf_counter()
        total = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            numbers = batch_numbers(step, micro, config.grad_accum, rank, world, config.batch_size)
            batch = data.batch([order(n) for n in numbers]).to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            total += loss.detach()
        mean = accelerator.reduce(total / config.grad_accum, reduction="mean").item()
        seconds = time.perf_counter() - began
        record = {"step": step + 1, "loss": mean, "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_per_step / seconds, "memory_gb": memory_gb(accelerator.device)}
        if main:
            with (out / LOG).open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['memory_gb']:.2f}GB")
            bar.update(1)
        if (step + 1) % config.save_every == 0 or step + 1 == end:
            path = ckpt.checkpoint_path(out, step + 1)
            accelerator.save_state(str(path))
            accelerator.wait_for_everyone()
            if main:
                ckpt.mark_complete(path, step + 1)
                ckpt.prune(out, config.keep_checkpoints)
    bar.close()

    if end < config.max_steps:
        if main:
            print(f"stopped after step {end} of {config.max_steps}; continue with --resume", file=sys.stderr)
        return None
    if not config.merge:
        return None
    state = accelerator.get_state_dict(model)
    result = out / "model"
    if main:
        merge_and_save(config, state, result)
        print(f"saved the fine-tuned model to {result}", file=sys.stderr)
        if config.evaluate:
            evaluate(config, result)
    accelerator.wait_for_everyone()
    return result


def evaluate(config: FinetuneConfig, path: Path) -> float:
    """Perplexity of the merged model (as ``rope_ext.load`` restores it, full attention) at the
    target length on ``eval_corpus``'s held-out split, through the eval harness; results go to
    ``<output_dir>/eval``."""
    from rope_ext import load
    from rope_ext.eval.ppl import perplexity

    model, tokenizer = load(path)
    records = perplexity(model, tokenizer, [config.target_length], ("none",), sliding=False, mode="concat",
                         n_docs=config.eval_docs, corpus=config.eval_corpus, run_dir=Path(config.output_dir) / "eval",
                         model_name=str(path), progress=False)
    value = records[0]["result"]["ppl"]
    print(f"perplexity at {config.target_length} tokens on {config.eval_corpus} (held out, {config.eval_docs} windows): {value:.4f}", file=sys.stderr)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rope_ext.longlora.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(config_from_args(args))
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"rope_ext.longlora.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
