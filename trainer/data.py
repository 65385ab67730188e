"""Task streams of a data root (trainer/layout.py), prompts, training batches, greedy eval.

`data.prompt_format: plain` (ref): "Task Instruction: {instruction}\nOptions: {o1 | o2 |
...}\nText: {sentence}\nAnswer:", target " {label}" + EOS. The EOS matters
(docs/method.md, "stop token"): without it the model never stops and exact match is 0.
`chat`: the same text as the user turn of the tokenizer's chat template, the label as the
assistant's reply ending with the template's end-of-turn token, which is then the stop, so
what a task teaches is what a /v1/chat/completions client gets.

The loss covers target tokens only; batched generation is left-padded and stops at the
stop token. Prompt and target are tokenized separately (no special tokens added) the same
way in training and evaluation, and a long text is cut inside the sentence so the prompt's
end and the target always fit `max_length`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.config import DataConfig
from trainer.errors import TrainerError
from trainer.freeform import (
    chat_eval_messages,
    chat_eval_prompt,
    chat_pairs,
    is_freeform,
    reference,
    rouge_l,
)
from trainer.layout import INDEX, read_examples, read_index, read_rows, spec_problem

IGNORE_INDEX = -100


def scored_targets(labels: Tensor) -> Tensor:
    """How many target tokens a causal LM's loss scores in `labels` (B, L): it predicts
    token t + 1 from position t, so column 0 is never scored."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case and collapse white space (the exact-match rule)."""
    return _WS.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    options: list[str]
    train: list[dict[str, Any]]  # benchmark: {"sentence", "label"}; free-form: the JSONL rows
    dev: list[dict[str, Any]]
    format: str = "benchmark"  # or "chat" / "completion" (trainer/freeform.py)
    metric: str = "exact"  # free-form: "exact" or "rougeL"


def _rows(
    path: Path, cap: int | None, rng: random.Random, read: Callable[[Path], list] = read_rows
) -> list[dict[str, Any]]:
    rows = read(path)
    if cap is not None and cap < len(rows):
        rows = rng.sample(rows, cap)
    return rows


def _stream_names(cfg: DataConfig, orders: dict[str, Any]) -> list[str]:
    """The task names of the configured stream, in order."""
    if cfg.tasks is not None:
        return list(cfg.tasks)
    if cfg.order not in orders:
        raise TrainerError(f"unknown order {cfg.order!r}; tasks.json has {sorted(orders)}")
    names = orders[cfg.order]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TrainerError(f"order {cfg.order!r} in tasks.json must be a list of task names")
    return names


def load_stream(cfg: DataConfig, seed: int, rename: dict[str, str] | None = None) -> list[Task]:
    """Load every task of the stream; row caps take a seeded random subset per task (drawn
    by the task's name in the root, whatever `rename` calls the loaded task)."""
    if not (cfg.root / INDEX).exists():
        raise TrainerError(
            f"data.root {cfg.root}: no {INDEX} there; get the benchmark with `jlserve data "
            f"cl-benchmark --source <checkout of alexandra-dragomir/JumpLoRA or "
            f"cmnfriend/O-LoRA> --out {cfg.root}` (docs/data.md)"
        )
    specs, orders = read_index(cfg.root)
    names = _stream_names(cfg, orders)
    if not names:
        raise TrainerError(f"order {cfg.order!r} in {cfg.root / 'tasks.json'} has no tasks")
    tasks = []
    for name in names:
        if name not in specs:
            raise TrainerError(f"task {name!r} is not in {cfg.root / INDEX}")
        problem = spec_problem(name, specs[name])
        if problem is not None:
            raise TrainerError(f"{cfg.root / INDEX}: {problem}")
        rng = random.Random(f"{seed}:{name}")
        spec = specs[name]
        read = read_examples if is_freeform(spec.get("format")) else read_rows
        tasks.append(
            Task(
                name=(rename or {}).get(name, name),
                instruction=spec.get("instruction", "").strip(),
                options=list(spec.get("options", [])),
                train=_rows(cfg.root / name / "train.json", cfg.train_rows, rng, read),
                dev=_rows(cfg.root / name / "dev.json", cfg.eval_rows, rng, read),
                format=spec.get("format", "benchmark"),
                metric=spec.get("metric", "exact"),
            )
        )
    return tasks


class ChatTemplate:
    """The tokenizer's chat template, as a chat client meets it through a server: the text
    it renders, tokenized without added special tokens (what vLLM's /v1/chat/completions
    does). A user turn becomes prompt ids ending with the assistant header; a label becomes
    the reply ids up to and including the template's end-of-turn token (the stop)."""

    _PROBE = "jlserve-probe-reply"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TrainerError(
                "data.prompt_format chat: the tokenizer has no chat template; use plain"
            )
        self.tok = tokenizer
        text = self._render([("user", "x"), ("assistant", self._PROBE)], generation=False)
        after = self._ids(text[text.rindex(self._PROBE) + len(self._PROBE) :])
        if not after or not self._is_special(after[0]):
            raise TrainerError(
                "data.prompt_format chat: the chat template ends the assistant's turn with no "
                "special token to stop at; use plain"
            )
        self.end_of_turn: int = after[0]
        self._replies: dict[str, list[int]] = {}

    def _is_special(self, token: int) -> bool:
        added = self.tok.added_tokens_decoder.get(token)
        return token in self.tok.all_special_ids or (added is not None and added.special)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _render(self, turns: list[tuple[str, str]], *, generation: bool) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    def prompt(self, user: str) -> list[int]:
        return self.conversation_prompt([("user", user)])

    def reply(self, label: str) -> list[int]:
        if label not in self._replies:
            self._replies[label] = self.conversation_reply([("user", "x")], label)
        return self._replies[label]

    def conversation_prompt(self, turns: list[tuple[str, str]]) -> list[int]:
        """The ids of `turns` (role, content) followed by the assistant's header."""
        return self._ids(self._render(turns, generation=True))

    def conversation_reply(self, turns: list[tuple[str, str]], content: str) -> list[int]:
        """The ids the assistant's reply `content` adds after `turns`, up to and including
        the end-of-turn token."""
        prompt = self.conversation_prompt(turns)
        full = self._ids(self._render([*turns, ("assistant", content)], generation=False))
        rest = full[len(prompt) :]
        if full[: len(prompt)] != prompt or self.end_of_turn not in rest:
            raise TrainerError(
                "the chat template's reply does not extend its generation prompt; use plain "
                "prompts (data.prompt_format) and completion-format task files"
            )
        return rest[: rest.index(self.end_of_turn) + 1]


class Encoder:
    """Turns rows into token ids: prompts (for eval) and prompt+target (for training).

    `plain`: the reference prompt ending in "\nAnswer:", target " {label}" + EOS.
    `chat`: the same instruction, options and text as the user turn of the tokenizer's chat
    template, the label as the assistant's reply ending with the end-of-turn token.
    `stop` is the token generation stops at: EOS, or the end-of-turn token."""

    def __init__(self, tokenizer: Any, max_length: int, prompt_format: str = "plain") -> None:
        if tokenizer.eos_token_id is None:
            raise TrainerError("the tokenizer has no EOS token; targets need one")
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.chat = ChatTemplate(tokenizer) if prompt_format == "chat" else None
        self.stop = self.eos if self.chat is None else self.chat.end_of_turn
        self._suffix = self._ids("\nAnswer:")
        self._template = self.chat  # chat-format task files need one whatever prompt_format

    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate(self.tok)
        return self._template

    def stop_for(self, task: Task) -> int:
        """The token generation stops at for `task`: its chat template's end of turn for a
        chat task file, EOS for a completion file, else the prompt format's stop."""
        if task.format == "chat":
            return self.template().end_of_turn
        return self.eos if task.format == "completion" else self.stop

    def _freeform_pair(self, task: Task, row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
        if task.format == "chat":
            return chat_pairs(self.template(), row)
        return [(self._ids(row["prompt"]), [*self._ids(row["completion"]), self.eos])]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def target(self, label: str) -> list[int]:
        if self.chat is not None:
            return self.chat.reply(label)
        return [*self._ids(" " + label), self.eos]

    def max_target_len(self, task: Task) -> int:
        """Longest target (label tokens + the stop token) among the task's labels; for a
        task file, among its evaluation answers."""
        if is_freeform(task.format):
            return max(len(self._freeform_pair(task, row)[-1][1]) for row in task.dev)
        labels = set(task.options) | {r["label"] for r in task.train + task.dev}
        return max(len(self.target(label)) for label in labels)

    @staticmethod
    def user_text(task: Task, sentence: str) -> str:
        """Instruction, options and text: the plain prompt's body, the chat's user turn."""
        return (
            f"Task Instruction: {task.instruction}\nOptions: {' | '.join(task.options)}\n"
            f"Text: {sentence}"
        )

    def body_budget(self, task: Task) -> int:
        """plain: body tokens before the "\nAnswer:" suffix; chat: prompt tokens; so that
        any target fits `max_length`. Fails when not even an empty text fits. (A task
        file's examples over max_length were dropped when it was read.)"""
        if is_freeform(task.format):
            return self.max_length
        room = self.max_length - self.max_target_len(task)
        fixed = (
            len(self._suffix)
            if self.chat is None
            else len(self.chat.prompt(self.user_text(task, "")))
        )
        if room - fixed < 1:
            raise TrainerError(
                f"data.max_length {self.max_length} is too short for task {task.name}"
            )
        return room - fixed if self.chat is None else room

    def prompt(self, task: Task, sentence: str, room: int) -> list[int]:
        """Prompt ids within `room` (body_budget), cut inside the sentence if needed."""
        if self.chat is not None:
            return self.chat_prompt(task, sentence, room)[1]
        return self._ids(self.user_text(task, sentence))[:room] + self._suffix

    def chat_prompt(self, task: Task, sentence: str, room: int) -> tuple[str, list[int]]:
        """(user turn, prompt ids) of at most `room` tokens: the sentence is cut by tokens
        and decoded back to text, because a chat client sends text."""
        assert self.chat is not None
        text = self.user_text(task, sentence)
        ids = self.chat.prompt(text)
        words = self._ids(sentence)
        keep = len(words)
        while len(ids) > room:
            if keep == 0:
                raise TrainerError(
                    f"data.max_length {self.max_length} is too short for task {task.name}"
                )
            keep = max(0, keep - (len(ids) - room))
            text = self.user_text(task, self.tok.decode(words[:keep]))
            ids = self.chat.prompt(text)
        return text, ids

    def train_examples(self, task: Task) -> list[tuple[list[int], list[int]]]:
        return self.pairs(task, task.train)

    def pairs(self, task: Task, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) of `rows`, the way the task is taught."""
        if is_freeform(task.format):
            return [pair for row in rows for pair in self._freeform_pair(task, row)]
        room = self.body_budget(task)
        return [(self.prompt(task, r["sentence"], room), self.target(r["label"])) for r in rows]

    def eval_prompts(self, task: Task) -> list[list[int]]:
        if task.format == "chat":
            return [chat_eval_prompt(self.template(), row) for row in task.dev]
        if task.format == "completion":
            return [self._ids(row["prompt"]) for row in task.dev]
        room = self.body_budget(task)
        return [self.prompt(task, r["sentence"], room) for r in task.dev]

    def eval_chats(self, task: Task) -> list[tuple[list[dict[str, str]], list[int]]]:
        """(messages, prompt ids) per dev row: what a chat client sends, what it becomes. A
        chat task file: its conversation before the last assistant turn."""
        if task.format == "chat":
            return [
                (chat_eval_messages(row), chat_eval_prompt(self.template(), row))
                for row in task.dev
            ]
        room = self.body_budget(task)
        chats = [self.chat_prompt(task, r["sentence"], room) for r in task.dev]
        return [([{"role": "user", "content": user}], ids) for user, ids in chats]

    def collate(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        """Right-padded (B, L) input_ids/attention_mask/labels; loss on target tokens only."""
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), length), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, t) in enumerate(batch):
            n = len(p) + len(t)
            ids[i, :n] = torch.tensor(p + t)
            labels[i, len(p) : n] = torch.tensor(t)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def left_pad(self, prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
        """(B, L) left-padded ids and attention mask, for batched generation."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
        return ids, mask


@dataclass(frozen=True)
class EvalResult:
    exact: float  # the metric
    prefix: float  # prediction starts with the label; shown beside exact, never instead
    n: int


@torch.no_grad()
def greedy_tokens(
    model: Any, enc: Encoder, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    device: torch.device, stop: int | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of token-id prompts, as token ids up to and including `stop`
    (default `enc.stop`; when reached): left-padded batches, shortest prompts together."""
    from transformers import GenerationConfig

    stop = enc.stop if stop is None else stop
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=enc.pad
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    generated: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = enc.left_pad([prompts[i] for i in idx])
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
        )
        for i, row in zip(idx, out[:, ids.shape[1] :].tolist(), strict=True):
            generated[i] = row[: row.index(stop) + 1] if stop in row else row
    model.train(was_training)
    return [generated[i] for i in range(len(prompts))]


def generate_greedy(
    model: Any, enc: Encoder, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    device: torch.device, stop: int | None = None,
) -> list[str]:  # fmt: skip
    """The texts of `greedy_tokens`, special tokens skipped."""
    tokens = greedy_tokens(model, enc, prompts, max_new_tokens, batch_size, device, stop)
    return [enc.tok.decode(t, skip_special_tokens=True) for t in tokens]


def score(task: Task, predictions: list[str]) -> EvalResult:
    """Exact match (the metric) and prefix match of predictions against the dev labels.
    A task file scored by ROUGE-L: its mean F1 is the metric, exact match beside it."""
    if is_freeform(task.format):
        refs = [reference(r) for r in task.dev]
        exact = sum(
            normalize(p) == normalize(y) for p, y in zip(predictions, refs, strict=True)
        ) / len(refs)
        metric = rouge_l(predictions, refs) if task.metric == "rougeL" else exact
        return EvalResult(exact=metric, prefix=exact, n=len(refs))
    labels = [normalize(r["label"]) for r in task.dev]
    preds = [normalize(p) for p in predictions]
    exact = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    prefix = sum(p.startswith(y) for p, y in zip(preds, labels, strict=True)) / len(labels)
    return EvalResult(exact=exact, prefix=prefix, n=len(labels))


@torch.no_grad()
def held_out_loss(
    model: Any, enc: Encoder, task: Task, batch_size: int, device: torch.device
) -> float:
    """Mean cross-entropy per target token on the task's held-out rows, as it is taught
    (teacher forcing): the metric every task has, free-form or not. Left-padded, so every
    row's targets end the batch and only the last positions' logits are computed (the
    vocabulary projection over every prompt token was a quarter of the time); rows of like
    length batched together (the mean does not depend on the batching; in the dev order,
    batches of 32 were 32-42 % padding on short_order_1's tasks, 6-9 % sorted)."""
    examples = sorted(enc.pairs(task, task.dev), key=lambda pair: len(pair[0]) + len(pair[1]))
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, mask = enc.left_pad([p + t for p, t in batch])  # (B, L)
        k = max(len(t) for _, t in batch)
        labels = torch.full((len(batch), k), IGNORE_INDEX, dtype=torch.long)  # (B, k)
        for i, (_, t) in enumerate(batch):
            labels[i, k - len(t) :] = torch.tensor(t)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as if unpadded (learned embeddings)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            logits_to_keep=k + 1,
        ).logits[:, :-1]  # (B, k, V): position t predicts token t + 1
        losses = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels.to(device), ignore_index=IGNORE_INDEX,
            reduction="sum",
        )  # fmt: skip
        total += float(losses)
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


def evaluate_task(
    model: Any, enc: Encoder, task: Task, batch_size: int, device: torch.device
) -> EvalResult:
    """Greedy generation on the task's dev rows; exact match after normalisation."""
    prompts = enc.eval_prompts(task)
    n, stop = enc.max_target_len(task), enc.stop_for(task)
    predictions = generate_greedy(model, enc, prompts, n, batch_size, device, stop)
    return score(task, predictions)
