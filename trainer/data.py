"""Task streams in the CL benchmark layout, prompts, training batches, batched greedy eval.

Layout: `<root>/tasks.json` ({"tasks": {name: {instruction, options}}, "orders": {...}})
and `<root>/<task>/{train,dev}.json` (lists of {"sentence", "label"}).

Prompt (ref): "Task Instruction: {instruction}\nOptions: {o1 | o2 | ...}\nText: {sentence}
\nAnswer:", target " {label}" + EOS. The EOS matters (method doc, "Measured trap"): without
it the model never stops and exact match is 0. The loss covers target tokens only; batched
generation is left-padded and stops at EOS. Prompt and target are tokenized separately
(no special tokens added) the same way in training and evaluation, and a long text is cut
inside the sentence so the "\nAnswer:" suffix and the target always fit `max_length`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.config import DataConfig
from trainer.errors import TrainerError

IGNORE_INDEX = -100
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case and collapse white space (the exact-match rule)."""
    return _WS.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    options: list[str]
    train: list[dict[str, str]]
    dev: list[dict[str, str]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise TrainerError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise TrainerError(f"{path}: not valid JSON ({exc})") from None


def _rows(path: Path, cap: int | None, rng: random.Random) -> list[dict[str, str]]:
    rows = _read_json(path)
    if not isinstance(rows, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("sentence"), str)
        and isinstance(r.get("label"), str)
        for r in rows
    ):
        raise TrainerError(f"{path}: expected a list of {{'sentence': str, 'label': str}}")
    if not rows:
        raise TrainerError(f"{path}: no rows")
    if cap is not None and cap < len(rows):
        rows = rng.sample(rows, cap)
    return rows


def _index(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tasks, orders) of `<root>/tasks.json`, checked for shape."""
    path = root / "tasks.json"
    index = _read_json(path)
    specs = index.get("tasks") if isinstance(index, dict) else None
    orders = index.get("orders", {}) if isinstance(index, dict) else None
    if not isinstance(specs, dict) or not isinstance(orders, dict):
        raise TrainerError(
            f"{path}: expected {{'tasks': {{name: ...}}, 'orders': {{name: [...]}}}}"
        )
    if not all(isinstance(spec, dict) for spec in specs.values()):
        raise TrainerError(f"{path}: every task must be a mapping (instruction, options)")
    return specs, orders


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


def load_stream(cfg: DataConfig, seed: int) -> list[Task]:
    """Load every task of the stream; row caps take a seeded random subset per task."""
    specs, orders = _index(cfg.root)
    names = _stream_names(cfg, orders)
    if not names:
        raise TrainerError(f"order {cfg.order!r} in {cfg.root / 'tasks.json'} has no tasks")
    tasks = []
    for name in names:
        if name not in specs:
            raise TrainerError(f"task {name!r} is not in {cfg.root / 'tasks.json'}")
        rng = random.Random(f"{seed}:{name}")
        tasks.append(
            Task(
                name=name,
                instruction=specs[name].get("instruction", "").strip(),
                options=list(specs[name].get("options", [])),
                train=_rows(cfg.root / name / "train.json", cfg.train_rows, rng),
                dev=_rows(cfg.root / name / "dev.json", cfg.eval_rows, rng),
            )
        )
    return tasks


class Encoder:
    """Turns rows into token ids: prompts (for eval) and prompt+target (for training)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if tokenizer.eos_token_id is None:
            raise TrainerError("the tokenizer has no EOS token; targets need one")
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._suffix = self._ids("\nAnswer:")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def target(self, label: str) -> list[int]:
        return [*self._ids(" " + label), self.eos]

    def max_target_len(self, task: Task) -> int:
        """Longest target (label tokens + EOS) among the task's options and labels."""
        labels = set(task.options) | {r["label"] for r in task.train + task.dev}
        return max(len(self.target(label)) for label in labels)

    def body_budget(self, task: Task) -> int:
        """Prompt tokens before the "\nAnswer:" suffix that leave room for any target."""
        room = self.max_length - self.max_target_len(task) - len(self._suffix)
        if room < 1:
            raise TrainerError(
                f"data.max_length {self.max_length} is too short for task {task.name}"
            )
        return room

    def prompt(self, task: Task, sentence: str, room: int) -> list[int]:
        """Prompt ids, cut inside the sentence to `room` tokens plus the suffix."""
        body = self._ids(
            f"Task Instruction: {task.instruction}\nOptions: {' | '.join(task.options)}\n"
            f"Text: {sentence}"
        )
        return body[:room] + self._suffix

    def train_examples(self, task: Task) -> list[tuple[list[int], list[int]]]:
        room = self.body_budget(task)
        return [
            (self.prompt(task, r["sentence"], room), self.target(r["label"])) for r in task.train
        ]

    def eval_prompts(self, task: Task) -> list[list[int]]:
        room = self.body_budget(task)
        return [self.prompt(task, r["sentence"], room) for r in task.dev]

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
def generate_greedy(
    model: Any, enc: Encoder, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    device: torch.device,
) -> list[str]:  # fmt: skip
    """Greedy continuations of token-id prompts: left-padded batches, stop at EOS."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=enc.eos, pad_token_id=enc.pad
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    predictions: dict[int, str] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = enc.left_pad([prompts[i] for i in idx])
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
        )
        texts = enc.tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        predictions.update(zip(idx, texts, strict=True))
    model.train(was_training)
    return [predictions[i] for i in range(len(prompts))]


def score(task: Task, predictions: list[str]) -> EvalResult:
    """Exact match (the metric) and prefix match of predictions against the dev labels."""
    labels = [normalize(r["label"]) for r in task.dev]
    preds = [normalize(p) for p in predictions]
    exact = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    prefix = sum(p.startswith(y) for p, y in zip(preds, labels, strict=True)) / len(labels)
    return EvalResult(exact=exact, prefix=prefix, n=len(labels))


def evaluate_task(
    model: Any, enc: Encoder, task: Task, batch_size: int, device: torch.device
) -> EvalResult:
    """Greedy generation on the task's dev rows; exact match after normalisation."""
    prompts = enc.eval_prompts(task)
    predictions = generate_greedy(model, enc, prompts, enc.max_target_len(task), batch_size, device)
    return score(task, predictions)
