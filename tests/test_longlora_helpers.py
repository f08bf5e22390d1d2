"""Shared builders for the LongLoRA tests (no tests here): a byte-level tokenizer, a tiny saved
Llama checkpoint, and a small patterned text corpus."""
from __future__ import annotations

import random
from pathlib import Path

import torch

TRAINED = 32


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + <pad>, <s>, </s>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_checkpoint(path: Path, model_type: str = "llama", seed: int = 0, tie: bool = True) -> Path:
    """Save a 2-layer random model (trained length 32, tied embeddings unless ``tie`` is off) and the
    byte tokenizer."""
    import transformers

    tokenizer = byte_tokenizer()
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def corpus(path: Path, documents: int = 40, seed: int = 0) -> Path:
    """Text files of short patterned sentences (easy to learn: the loss falls within a few steps)."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "rope", "scale", "token", "length"]
    for i in range(documents):
        lines = [f"{rng.choice(words)} {rng.choice(words)} number {rng.randint(0, 99)} ends here." for _ in range(8)]
        (path / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return path
