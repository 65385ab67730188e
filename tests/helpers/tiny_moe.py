"""A tiny random Mixtral (4 experts, top-2), for the tests of layers vLLM transforms."""

from __future__ import annotations

from pathlib import Path

import torch

from jlserve.models.tiny import build_tokenizer


def build_tiny_mixtral(out_dir: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = build_tokenizer(384)
    config = MixtralConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # head_dim 32: vLLM's CPU attention needs >= 32
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
