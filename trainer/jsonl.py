"""A user's task file for training: its tokens, and the examples held out of training.

Reading and checking the file is the task file format's job (`jlserve.taskfile`, shared
with the server, which checks an upload before queueing a job); this module adds what
training needs on top: token counts under the tokenizer's chat template, and the seeded
held-out split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

from jlserve.taskfile import (
    HELD_OUT_MAX,
    HELD_OUT_MIN,
    HELD_OUT_SHARE,
    CompletionExample,
    Example,
    TaskFile,
    TokenCounter,
    held_out_size,
)
from trainer.errors import TrainerError

T = TypeVar("T")


def token_counter(tokenizer: Any) -> TokenCounter:
    """Tokens of an example as training feeds it, for `read_task_file`: a chat example as
    the tokenizer's chat template renders it, tokenized without added special tokens (as
    vLLM's /v1/chat/completions does); a completion example as prompt + completion + EOS
    (the plain prompt format's target ends in EOS)."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(example: Example) -> int:
        if isinstance(example, CompletionExample):
            return len(ids(example.prompt)) + len(ids(example.completion)) + 1
        if not getattr(tokenizer, "chat_template", None):
            raise TrainerError("the tokenizer has no chat template to count chat examples with")
        messages = [
            {"role": m.role, "content": m.content} | ({"name": m.name} if m.name else {})
            for m in example.messages
        ]
        return len(ids(tokenizer.apply_chat_template(messages, tokenize=False)))

    return count


def split_held_out(
    examples: Sequence[T],
    *,
    seed: int,
    share: float = HELD_OUT_SHARE,
    minimum: int = HELD_OUT_MIN,
    maximum: int = HELD_OUT_MAX,
) -> tuple[list[T], list[T]]:
    """(train, held_out), both in file order: a seeded sample of `held_out_size` positions
    held out, the rest trained on. The same seed gives the same split; identical examples
    at two positions are not merged, so they can land on both sides."""
    size = held_out_size(len(examples), share=share, minimum=minimum, maximum=maximum)
    held = set(random.Random(seed).sample(range(len(examples)), size))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def split_task(
    task: TaskFile,
    *,
    seed: int,
    validation: TaskFile | None = None,
    share: float = HELD_OUT_SHARE,
    minimum: int = HELD_OUT_MIN,
    maximum: int = HELD_OUT_MAX,
) -> tuple[list[Example], list[Example]]:
    """(train, held_out): every example of `task` and of `validation` (read with
    `read_task_file`, in the same format) when one is given, else `split_held_out`."""
    if validation is None:
        return split_held_out(
            task.examples, seed=seed, share=share, minimum=minimum, maximum=maximum
        )
    if validation.format != task.format:
        raise TrainerError(
            f"{validation.path}: {validation.format} format, but the task file {task.path} "
            f"is in {task.format} format"
        )
    return list(task.examples), list(validation.examples)
