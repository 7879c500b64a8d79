"""Tiny random models and a tiny tokenizer, built offline from configs, for tests of every model family."""

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from ctxaware.tokenizer import train_tokenizer


# Families whose attention goes through transformers' AttentionInterface.
FAMILY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "gemma": GemmaConfig,
}
FAMILIES = tuple(FAMILY_CONFIGS)

TOKENIZER_CORPUS = [
    "The river Alna flows past the town of Bero. Bero was founded in 1204.",
    "Question: What is 17 + 25? Answer: 42.",
    "The passkey is 83512. Remember it. The grass is green. The sky is blue.",
    "Summary: the council met and agreed to build a bridge over the river.",
] * 20


def build_tiny_tokenizer(vocab_size: int = 320):
    return train_tokenizer(TOKENIZER_CORPUS, vocab_size=vocab_size)


def tiny_config(
    family: str,
    *,
    gqa: bool = True,
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    head_dim: int = 8,
    max_position_embeddings: int = 512,
    **overrides,
) -> PretrainedConfig:
    """A two-layer config of `family`; `gqa` gives 2 kv heads for 4 query heads, otherwise MHA."""
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"Unknown family {family!r}; choose one of {', '.join(FAMILIES)}.")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if gqa else num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return FAMILY_CONFIGS[family](**kwargs)


def tiny_model(family: str, *, gqa: bool = True, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, gqa=gqa, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


def left_padded_prompts(lengths=(40, 33), seed=0, *, pad: int = 2, high: int = 300):
    """Left-padded random prompts of different lengths (ids in [3, high)), as batched generation builds them."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, high, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask
