"""The LongLoRA fine-tune loop (Chen et al. 2023, arXiv 2309.12307): S2-Attn (or LongNet's dilated
attention, or full attention) + LoRA+ with any frequency method, on one process or many through accelerate.

    python -m rope_ext.longlora.train --recipe recipes/lab-128-to-512.yaml --model lab/ --data corpus/
    accelerate launch --cpu --num_processes 2 -m rope_ext.longlora.train --recipe ... # DDP
    rope-ext finetune --recipe ... --num-processes 2                                 # the same

Every setting is checked, the data tokenised (cached) and the model built before the first step;
checkpoints every ``save_every`` steps; ``--resume`` continues the same run with the same data order
and loss trajectory; at the end the LoRA adapters are merged and a normal checkpoint is saved in
``<output_dir>/model``, and with ``--save-adapter`` the peft adapter (LoRA + the trained embedding /
norm copies) in ``<output_dir>/adapter``. Losses go to ``<output_dir>/train_log.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from .model import load_base, merge_and_save, prepare, rebuild, save_adapter, test_method, training_pattern
from .sequence_parallel import Place, check_world, enable, shard, shard_loss

logger = logging.getLogger(__name__)

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
    """Keep the log's records up to ``step`` (a resumed run rewrites the steps after it)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


@dataclass(frozen=True)
class Job:
    """What every step of one invocation shares: the settings, accelerate's handle (this process's
    place among ``world`` processes), the output directory and, with sequence parallelism, this
    process's place in its group (the processes of a group share each sequence)."""

    config: FinetuneConfig
    accelerator: Any
    out: Path
    place: Place | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def data_rank(self) -> int:
        """Which share of the data this process reads (the processes of a sequence group read the same)."""
        return self.place.dp_rank if self.place else self.rank

    @property
    def data_world(self) -> int:
        return self.place.dp_world if self.place else self.world


@dataclass(frozen=True)
class Training:
    """What the step loop works on: the prepared model, its optimizer and schedule, the trainable
    parameters (for clipping), the packed sequences and their seeded order."""

    model: Any
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    data: PackedSequences
    order: SampleOrder


def train(config: FinetuneConfig) -> Path | None:
    """Run (or resume) the fine-tune; returns the merged model's directory, or None when the run
    stopped early (``stop_after``) or ``merge`` is off (the adapter, if saved, is in
    ``<output_dir>/adapter``)."""
    job = start_job(config)
    files, done = check_inputs(job)
    model, tokenizer = build_model(config)
    split_sequences(job, model)
    data, order = build_data(job, tokenizer, files)
    training = build_training(job, model, data, order)
    start = resume_or_begin(job, training, done)
    end = last_step(config, start)
    announce(job, training, start, end)
    run_steps(job, training, start, end)
    return finish(job, training.model, end)


def start_job(config: FinetuneConfig) -> Job:
    """Start accelerate (mixed precision, gradient accumulation) for this process."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision), gradient_accumulation_steps=config.grad_accum)
    size = config.sequence_parallel
    if size == 1:
        return Job(config, accelerator, Path(config.output_dir))
    check_world(size, accelerator.num_processes)
    return Job(config, accelerator, Path(config.output_dir), Place(size, accelerator.process_index, accelerator.num_processes))


def check_inputs(job: Job) -> tuple[list[Path], list[tuple[int, Path]]]:
    """The data files and the complete checkpoints already in ``output_dir``, after every check that
    needs no model: data and eval corpus exist, ``--resume`` has a matching run to continue, a new
    run does not overwrite an old one."""
    config, out = job.config, job.out
    files = collect_files(config.data, config.data_extensions)
    if config.evaluate and config.eval_corpus != "stdlib" and not Path(config.eval_corpus).exists():
        raise FileNotFoundError(f"eval_corpus {config.eval_corpus!r} not found: give 'stdlib', a directory, a .jsonl or a text file")
    done = ckpt.complete_checkpoints(out)
    if config.resume:
        if not done:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
        ckpt.check_resume(out, config, job.world)
        ckpt.check_loadable(done[-1][1], ckpt.engine(job.accelerator), config.trust_engine_checkpoints)
    elif done:
        raise ValueError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or choose another output_dir")
    return files, done


def build_model(config: FinetuneConfig) -> tuple[torch.nn.Module, Any]:
    """Seed every RNG, then load the base model and tokenizer and make it trainable (position
    method, S2-Attn, LoRA or full fine-tuning)."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model, tokenizer = load_base(config)
    return prepare(config, model), tokenizer


def split_sequences(job: Job, model: torch.nn.Module) -> None:
    """With ``sequence_parallel`` N > 1: DeepSpeed Ulysses in the model's attention (registered for
    this model directly, ``sequence_parallel.enable``), each process then running 1/N of every sequence."""
    if job.place is None:
        return
    config = job.config
    enable(model, config.sequence_parallel, config.batch_size, config.target_length)
    if job.is_main:
        logger.info(f"sequence parallel: each sequence split over {config.sequence_parallel} processes by DeepSpeed Ulysses, "
                    f"registered with DeepSpeed directly around the attention {model.config._attn_implementation!r} (accelerate's "
                    "ParallelismConfig accepts only sdpa / flash names and needs the DeepSpeed engine)")


def build_data(job: Job, tokenizer: Any, files: list[Path]) -> tuple[PackedSequences, SampleOrder]:
    """Tokenise the files (the main process first, so that the others read its cache), pack them
    into sequences of the target length, and fix their seeded order."""
    config = job.config
    with job.accelerator.main_process_first():
        ids, _ = load_tokens(tokenizer, files, config.text_key, config.cache_dir, show_progress=job.is_main)
    data = PackedSequences(ids, config.target_length)
    return data, SampleOrder(len(data), config.seed)


def build_training(job: Job, model: torch.nn.Module, data: PackedSequences, order: SampleOrder) -> Training:
    """What the loop works on: AdamW over the trainable parameters and the learning-rate schedule,
    the model and optimizer wrapped by accelerate."""
    from transformers import get_scheduler

    config, accelerator = job.config, job.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Training(model, optimizer, scheduler, params, data, order)


def resume_or_begin(job: Job, training: Training, done: list[tuple[int, Path]]) -> int:
    """The first step to run: with ``--resume`` the last complete checkpoint is loaded (trainable
    weights, optimizer, scheduler, RNG states; safetensors + JSON, never pickle) and the log cut back
    to it; otherwise the run's settings are written and the log started afresh."""
    if job.config.resume:
        start, path = done[-1]
        ckpt.load_checkpoint(job.accelerator, training.model, training.optimizer, training.scheduler, path,
                             job.config.trust_engine_checkpoints)
        if job.is_main:
            _truncate_log(job.out / LOG, start)
        return start
    if job.is_main:
        ckpt.write_run_config(job.out, job.config, job.world)
        (job.out / LOG).unlink(missing_ok=True)
    return 0


def last_step(config: FinetuneConfig, start: int) -> int:
    """The step this invocation stops after: ``max_steps``, or ``stop_after`` steps past ``start``."""
    return min(config.max_steps, start + config.stop_after) if config.stop_after else config.max_steps


def announce(job: Job, training: Training, start: int, end: int) -> None:
    """One line on stderr (main process): what is trained, on how much data, by how many processes."""
    if job.is_main:
        config = job.config
        logger.info(f"fine-tuning {config.model} to {config.target_length} tokens: {len(training.data)} sequences, {job.world} "
                    f"process(es), {sum(p.numel() for p in training.params):,} trainable parameters, steps {start}..{end} of {config.max_steps}")


def run_steps(job: Job, training: Training, start: int, end: int) -> None:
    """Optimizer steps ``start`` .. ``end``: each logged to train_log.jsonl and the progress bar,
    a checkpoint every ``save_every`` steps and after the last."""
    config = job.config
    tokens_per_step = config.batch_size * config.grad_accum * job.data_world * config.target_length
    training.model.train()
    bar = tqdm(total=config.max_steps, initial=start, desc="fine-tuning", unit="step", disable=not job.is_main)
    for step in range(start, end):
        began = time.perf_counter()
        try:
            mean = train_step(job, training, step)
        except FloatingPointError as err:
            kept = step if step > start and step % config.save_every else None
            if kept is not None:
                save_checkpoint(job, training, kept)
            last = ckpt.complete_checkpoints(job.out)
            where = f"the last good state is {last[-1][1]} (after step {last[-1][0]})" if last else "no step was saved"
            raise FloatingPointError(f"{err}; training stopped, {where}: lower --learning-rate or check the data, "
                                     f"then --resume") from None
        seconds = time.perf_counter() - began
        record = {"step": step + 1, "loss": mean, "lr": training.scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_per_step / seconds, "memory_gb": memory_gb(job.accelerator.device)}
        if job.is_main:
            log_step(job.out / LOG, record, bar)
        if (step + 1) % config.save_every == 0 or step + 1 == end:
            save_checkpoint(job, training, step + 1)
    bar.close()


def train_step(job: Job, training: Training, step: int) -> float:
    """One optimizer step of ``grad_accum`` micro-batches (this process's share of the step's
    sequences); returns the loss averaged over micro-batches and processes."""
    config, accelerator, model = job.config, job.accelerator, training.model
    total = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        numbers = batch_numbers(step, micro, config.grad_accum, job.data_rank, job.data_world, config.batch_size)
        batch = training.data.batch([training.order(n) for n in numbers]).to(accelerator.device)
        with accelerator.accumulate(model):
            loss = causal_lm_loss(job, model, batch)
            if accelerator.reduce(torch.isfinite(loss.detach()).float(), reduction="sum").item() < job.world:
                raise FloatingPointError(f"fine-tuning: the loss became non-finite ({loss.item()}) at step {step + 1}")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(training.params, config.max_grad_norm)
            training.optimizer.step()
            if accelerator.sync_gradients:
                training.scheduler.step()
            training.optimizer.zero_grad()
        total += loss.detach()
    return accelerator.reduce(total / config.grad_accum, reduction="mean").item()


def causal_lm_loss(job: Job, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of ``batch``; with sequence parallelism this process's term of it
    (``sequence_parallel.shard_loss``: gradients averaged over the processes, as DDP does, give the
    whole sequences' gradient)."""
    if job.place is None:
        return model(input_ids=batch, labels=batch).loss
    tokens, positions, labels = shard(batch, job.place)
    return shard_loss(model(input_ids=tokens, position_ids=positions).logits, labels, job.place, batch.shape[1])


def log_step(path: Path, record: dict[str, Any], bar: tqdm) -> None:
    """Append a step's record to the JSONL log and show it on the progress bar."""
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['memory_gb']:.2f}GB")
    bar.update(1)


def save_checkpoint(job: Job, training: Training, step: int) -> None:
    """Save every process's state after ``step`` (written aside, then renamed into place complete);
    the main process then deletes the oldest beyond ``keep_checkpoints``."""
    path = ckpt.checkpoint_path(job.out, step)
    ckpt.save_checkpoint(job.accelerator, training.model, training.optimizer, training.scheduler, path, step)
    if job.is_main:
        ckpt.prune(job.out, job.config.keep_checkpoints)


def finish(job: Job, model: torch.nn.Module, end: int) -> Path | None:
    """After the last step: the peft adapter saved in ``<output_dir>/adapter`` when ``save_adapter``
    is on; the LoRA adapters merged into a normal checkpoint in ``<output_dir>/model`` when ``merge``
    is on, whose path is returned (and whose perplexity is measured when ``evaluate`` is on).
    None when stopped early or ``merge`` is off."""
    config = job.config
    if end < config.max_steps:
        if job.is_main:
            logger.warning(f"stopped after step {end} of {config.max_steps}; continue with --resume")
        return None
    if not (config.merge or config.save_adapter):
        return None
    state = job.accelerator.get_state_dict(model)
    result = job.out / "model"
    if job.is_main:
        trained, tokenizer = rebuild(config, state)
        if config.save_adapter:
            logger.info(f"saved the adapter to {save_adapter(trained, job.out / 'adapter')}")
        if config.merge:
            merge_and_save(trained, tokenizer, result, test_method(config, training_pattern(config, trained)))
            logger.info(f"saved the fine-tuned model to {result}")
            if config.evaluate:
                evaluate(config, result)
    job.accelerator.wait_for_everyone()
    return result if config.merge else None


def evaluate(config: FinetuneConfig, path: Path) -> float:
    """Perplexity of the merged model (as ``rope_ext.load`` restores it: full attention, or dilated with
    ``test_attention dilated``) at the
    target length on ``eval_corpus``'s held-out split, through the eval harness; results go to
    ``<output_dir>/eval``."""
    from rope_ext import load
    from rope_ext.eval.ppl import perplexity

    model, tokenizer = load(path)
    records = perplexity(model, tokenizer, [config.target_length], ("none",), sliding=False, mode="concat",
                         n_docs=config.eval_docs, corpus=config.eval_corpus, run_dir=Path(config.output_dir) / "eval",
                         model_name=str(path), progress=False)
    value = records[0]["result"]["ppl"]
    logger.info(f"perplexity at {config.target_length} tokens on {config.eval_corpus} (held out, {config.eval_docs} windows): {value:.4f}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rope_ext.longlora.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers and not logging.getLogger("rope_ext").handlers:  # run as its own process
        logging.basicConfig(level=logging.INFO, format="rope-ext: %(message)s")
    try:
        train(config_from_args(args))
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"rope_ext.longlora.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
