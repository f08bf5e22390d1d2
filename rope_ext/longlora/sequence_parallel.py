"""Sequence parallelism for the fine-tune through DeepSpeed Ulysses (Jacobs et al. 2023, "DeepSpeed
Ulysses", arXiv 2309.14509; its Hugging Face port from ALST, Bekman et al. 2025, arXiv 2506.13996).

N processes share each sequence of L tokens: every one holds L/N consecutive tokens at their true
global positions through embeddings, rotary, norms and MLPs; inside attention DeepSpeed's
``UlyssesSPAttentionHF`` exchanges (all-to-all) to the whole sequence over H/N heads, calls the
model's attention function there and exchanges back. rope-ext's attention functions (ReRoPE family,
S2-Attn, log-n scaling) therefore see every position and stay exact.

Registration: DeepSpeed's ``register_with_transformers`` (what accelerate's
``ParallelismConfig(sp_backend="deepspeed")`` calls) overwrites the process-wide entry of the
model's attention name, and accelerate accepts only sdpa / flash names, not rope-ext's
``rope_ext_sdpa``; wrapping plain ``sdpa`` globally would also reroute the sdpa call inside
``rope_ext_sdpa``. So the Ulysses module is built here around the model's own attention function
and registered under a name of its own, selected in this model's config alone.

Limits, refused before anything changes: heads and key/value heads divisible by N, L divisible by
N, processes a multiple of N, no padding (the wrapper drops the attention mask: causal only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rope_ext.patch import model_configs

from .s2attn import Causal, S2Attn, shifted, shifted_sparse_attention

PREFIX = "rope_ext_ulysses_"
INSTALL = "pip install deepspeed"


def require_deepspeed(size: int) -> None:
    """Refuse ``size`` > 1 where DeepSpeed cannot be imported, naming the install command."""
    if size > 1:
        try:
            import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401
        except ImportError as err:
            raise ImportError(f"sequence_parallel={size} runs on DeepSpeed's Ulysses, which is not importable here ({err}); "
                              f"install it with `{INSTALL}`, or use sequence_parallel 1") from None


def check_length(size: int, length: int) -> None:
    if length % size:
        raise ValueError(f"sequence_parallel={size} must divide target_length={length}: each process holds "
                         f"target_length / sequence_parallel tokens")


def check_model(config: Any, size: int) -> None:
    """Ulysses splits the heads over the processes: query and key/value heads divisible by ``size``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for name, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count % size:
            raise ValueError(f"sequence_parallel={size} must divide the model's {name}={count} (Ulysses gives each process "
                             f"{name} / sequence_parallel heads); choose a divisor of {count}")
    if getattr(config, "_attn_implementation", None) in ("eager", None):
        raise ValueError("sequence parallelism needs attn_implementation sdpa or flash_attention_*, not eager: the Ulysses "
                         "wrapper drops the attention mask, which eager needs")


def check_world(size: int, world: int) -> None:
    if world % size:
        raise ValueError(f"sequence_parallel={size} needs a multiple of {size} processes, got {world}; launch with "
                         f"--num-processes {size} (or a multiple)")


@dataclass(frozen=True)
class Place:
    """This process in the layout of DeepSpeed's groups: ranks [i*N, (i+1)*N) share a sequence."""

    size: int
    rank: int
    world: int

    @property
    def sp_rank(self) -> int:
        return self.rank % self.size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.size

    @property
    def dp_world(self) -> int:
        return self.world // self.size


@dataclass(frozen=True)
class HeadShard:
    """S2-Attn on the heads ``first_head`` .. of ``heads`` that one Ulysses process holds: a head is
    shifted when its global index is >= heads // 2, as in ``shifted_sparse_attention`` on all heads."""

    pattern: S2Attn
    first_head: int
    heads: int

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: Causal) -> torch.Tensor:
        size, length = self.pattern.group_size_for(query.shape[2]), query.shape[2]
        if not self.pattern.shift or size >= length or size < 2:
            return self.pattern.attend(query, key, value, causal)
        local, group = query.shape[1], query.shape[1] // key.shape[1]
        split = min(max(self.heads // 2 - self.first_head, 0), local)

        def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return shifted_sparse_attention(q, k, v, causal, size, shift=False)

        def moved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return shifted(q, k, v, causal, size, self.pattern.wrap)

        if split in (0, local):
            return (moved if split == 0 else plain)(query, key, value)
        if split % group == 0:
            kv = split // group
            return torch.cat([plain(query[:, :split], key[:, :kv], value[:, :kv]),
                              moved(query[:, split:], key[:, kv:], value[:, kv:])], dim=2)
        return torch.cat([plain(query, key, value)[:, :, :split], moved(query, key, value)[:, :, split:]], dim=2)


def _group(size: int) -> Any:
    """DeepSpeed's sequence-parallel process group of this process (created once per process)."""
    import deepspeed.comm as ds_comm
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if not torch.distributed.is_initialized():
        raise ValueError("sequence parallelism needs torch.distributed initialised (launch with accelerate or torchrun)")
    ds_comm.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False, verbose=False)
    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    elif mpu.get_sequence_parallel_world_size() != size:
        raise ValueError(f"this process already has sequence-parallel groups of {mpu.get_sequence_parallel_world_size()}, "
                         f"not {size}")
    return mpu.get_sequence_parallel_group()


def enable(model: nn.Module, size: int, batch_size: int, length: int) -> Place:
    """Make ``model`` (patched or not, peft-wrapped or not) run with its sequences split over groups
    of ``size`` processes, for micro-batches of ``batch_size`` sequences of ``length`` tokens; this
    process then passes its shard (``shard``) and gets its shard's logits. Returns its place."""
    require_deepspeed(size)
    check_length(size, length)
    check_model(model.config, size)
    check_world(size, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    if name.startswith(PREFIX):
        raise ValueError("this model's sequences are already split over processes (sequence_parallel.enable was called on it)")
    runtimes = {id(r): r for m in model.modules() if (r := getattr(m, "rope_ext_runtime", None)) is not None}.values()
    for runtime in runtimes:
        if runtime.train_attention is not None and not isinstance(runtime.train_attention, S2Attn):
            raise ValueError(f"sequence parallelism carries S2-Attn as training attention, not {type(runtime.train_attention).__name__}: "
                             "a pattern that depends on the head index needs to know which heads each process holds")
    group = _group(size)
    place = Place(size, torch.distributed.get_rank(), torch.distributed.get_world_size())
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    ulysses = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[name], batch_size=batch_size, attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=getattr(text, "num_key_value_heads", None) or heads, num_hidden_layers=text.num_hidden_layers,
        process_group=group, local_seq_length=length // size, global_seq_length=length)
    ulysses.core_attn_implementation = name

    def ulysses_attention(module, query, key, value, attention_mask, *args, **kwargs):
        return ulysses(module, query, key, value, None, *args, **kwargs)

    wrapped = f"{PREFIX}{name}_{id(ulysses)}"
    AttentionInterface.register(wrapped, ulysses_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    for config in model_configs(model):
        config._attn_implementation_internal = wrapped
    for runtime in runtimes:
        if runtime.train_attention is not None:
            runtime.train_attention = HeadShard(runtime.train_attention, place.sp_rank * (heads // size), heads)
    return place


def shard(batch: torch.Tensor, place: Place, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's share of a batch (B, L) of whole sequences: (input_ids, position_ids, labels),
    each (B, L / N); labels are the next tokens of the whole sequence (-100 after the last), shifted
    before splitting, so the last token of a shard predicts the first of the next."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("sequence parallelism needs unpadded batches (the Ulysses wrapper attends causally over whole "
                         "sequences and drops the attention mask); got padding in attention_mask")
    length = batch.shape[1]
    check_length(place.size, length)
    labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1)
    positions = torch.arange(length, device=batch.device).expand_as(batch)
    cut = slice(place.sp_rank * (length // place.size), (place.sp_rank + 1) * (length // place.size))
    return batch[:, cut], positions[:, cut], labels[:, cut]


def shard_loss(logits: torch.Tensor, labels: torch.Tensor, place: Place, sequence_length: int) -> torch.Tensor:
    """This process's term of the causal-LM loss: its tokens' summed cross-entropy over all B (L - 1)
    predicted tokens, times N. Data-parallel gradient averaging over all processes then gives each
    group's whole-sequence mean loss gradient (the processes of a group hold parts of one gradient,
    whose sum is the whole), and the mean of the terms over the processes is the mean loss."""
    total = logits.shape[0] * (sequence_length - 1)
    summed = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return summed * place.size / total
