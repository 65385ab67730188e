"""A tiny random Llama with a real byte-level BPE tokenizer, built offline in seconds.

For fast tests of everything that needs "a real HF checkpoint that vLLM loads":
attention head_dim is 32 (vLLM's CPU attention needs >= 32), the tokenizer is
trained locally on a few hundred sentences, and the chat template is ChatML.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from jlserve.checkpoint import prepare_output_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "be",
    "are",
    "or",
    "not",
    "world",
    "sports",
    "business",
    "science",
    "technology",
    "news",
    "company",
    "market",
    "game",
    "team",
    "player",
    "win",
    "good",
    "bad",
    "great",
    "terrible",
    "movie",
    "film",
    "review",
    "product",
    "service",
    "food",
    "price",
    "quality",
    "true",
    "false",
    "yes",
    "no",
    "answer",
    "question",
    "text",
    "task",
    "instruction",
    "options",
    "sentence",
    "label",
    "paris",
    "france",
    "capital",
    "city",
    "river",
    "music",
    "school",
    "water",
    "house",
    "people",
    "time",
    "year",
    "day",
    "entailment",
    "contradiction",
    "neutral",
    "positive",
    "negative",
    "title",
    "stock",
    "oil",
    "share",
    "report",
]


class TinyLlamaSpec(BaseModel):
    """Shape of the tiny model. Defaults give ~0.2 M parameters."""

    hidden_size: int = Field(64, ge=32)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    num_key_value_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(128, ge=1)
    vocab_size: int = Field(384, ge=300)
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    seed: int = 0


def _training_corpus(n: int = 400) -> list[str]:
    gen = torch.Generator().manual_seed(1234)
    lines = []
    for _ in range(n):
        idx = torch.randint(len(_WORDS), (12,), generator=gen).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx).capitalize() + ".")
    return [*lines, "Task Instruction: Options: Text: Answer:", "0123456789 | ? ! , ; : ' \""]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_llama(out_dir: Path, spec: TinyLlamaSpec | None = None) -> Path:
    """Write a random tiny Llama checkpoint (safetensors, config, tokenizer) to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyLlamaSpec()
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir)
    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tokenizer.eos_token_id, "do_sample": False}, indent=2)
    )
    return out_dir
