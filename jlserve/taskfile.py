"""The task file format: a user's task in JSON Lines, read and checked line by line.

The contract between whoever sends a task (a file on disk, an upload to the fine-tuning
jobs API) and the trainer: the server checks an upload with this module before it queues
a job, the trainer reads it with the same code, so both refuse the same files.

Two formats (docs/data.md), told apart by content, never by the file's name:

    chat        {"messages": [{"role": "system" | "user" | "assistant", "content": str,
                               "weight": 0 | 1, "name": str}, ...]}
    completion  {"prompt": str, "completion": str}

The first line that is an object with "messages" (chat) or "prompt" (completion) sets the
format of the whole file. The checks follow OpenAI's fine-tuning file checks: every problem
is one line naming the file's line (and, in a chat example, the message), 1-based, so a
user fixes a file in one pass rather than one error per attempt. Blank lines are skipped.
Examples longer than `max_length` tokens are dropped, never cut (a cut conversation may
lose the reply it teaches), and the returned `TaskFile` says which.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jlserve.errors import JlserveError

Format = Literal["chat", "completion"]
Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
CHAT_KEYS = ("messages",)
MESSAGE_KEYS = ("role", "content", "weight", "name")
COMPLETION_KEYS = ("prompt", "completion")
MIN_EXAMPLES = 10  # usable examples a file needs; also what a held-out split leaves to train on
MAX_PROBLEMS = 20  # report lines shown; the rest are counted
HELD_OUT_SHARE = 0.1  # without a validation file: this share of the examples is held out
HELD_OUT_MIN = 20
HELD_OUT_MAX = 500
MAX_FILE_BYTES = 512 * 2**20  # OpenAI's limit as well; the whole file is held in memory


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    weight: int | None = None  # 0 or 1, assistant turns only; None: not given (learned)
    name: str | None = None

    @property
    def learned(self) -> bool:
        """An assistant turn the model is trained to produce (weight 1 or not given)."""
        return self.role == "assistant" and self.weight != 0


@dataclass(frozen=True)
class ChatExample:
    line: int  # 1-based line of the file: what any later report about the example names
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class CompletionExample:
    line: int
    prompt: str
    completion: str


Example = ChatExample | CompletionExample
TokenCounter = Callable[[Example], int]


def as_row(example: Example) -> dict[str, Any]:
    """The example as the JSON object it was read from (the keys it gave), for a run's copy."""
    if isinstance(example, CompletionExample):
        return {"prompt": example.prompt, "completion": example.completion}
    messages = []
    for m in example.messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        message.update({k: v for k, v in (("weight", m.weight), ("name", m.name)) if v is not None})
        messages.append(message)
    return {"messages": messages}


@dataclass(frozen=True)
class TaskFile:
    """A checked task file: its usable examples in file order, and what was dropped."""

    path: Path
    format: Format
    examples: tuple[Example, ...]
    dropped: tuple[int, ...]  # lines of the examples over max_length, left out of training
    notes: tuple[str, ...]  # the length policy's report, one line each; empty: none dropped


class TaskFileError(JlserveError):
    """A task file with problems: `report` holds at most MAX_PROBLEMS + 1 lines (the last
    counting the rest), `count` all of them."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.report = _capped(problems, "problems")
        self.count = len(problems)
        plural = "s" * (self.count > 1)
        super().__init__(f"{path}: {self.count} problem{plural}:\n" + "\n".join(self.report))


def _capped(lines: list[str], what: str) -> list[str]:
    if len(lines) <= MAX_PROBLEMS:
        return lines
    return [*lines[:MAX_PROBLEMS], f"... and {len(lines) - MAX_PROBLEMS} more {what}"]


def _kind(value: Any) -> str:
    """A JSON value's kind, as a problem line names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "an object"


def _show(value: Any) -> str:
    """A value quoted in a problem line: strings as 'bot', the rest as JSON spells them."""
    return repr(value) if isinstance(value, str) else json.dumps(value)


def _read_text(path: Path) -> str:
    """The file as text, or a TaskFileError with its one problem."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            limit = f"{MAX_FILE_BYTES:,} bytes ({MAX_FILE_BYTES // 2**20} MiB)"
            raise TaskFileError(path, [f"{size:,} bytes, over the limit of {limit}"])
        data = path.read_bytes()
    except OSError as exc:
        raise TaskFileError(path, [f"cannot read ({exc.strerror})"]) from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TaskFileError(
            path,
            [
                f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}): "
                "JSON Lines files are UTF-8"
            ],
        ) from None


def _unknown_keys(value: dict, allowed: tuple[str, ...], where: str) -> list[str]:
    return [
        f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})"
        for key in value
        if key not in allowed
    ]


def _message(value: Any, where: str, problems: list[str]) -> Message | None:
    if not isinstance(value, dict):
        problems.append(f"{where}: not a JSON object but {_kind(value)}")
        return None
    before = len(problems)
    problems += _unknown_keys(value, MESSAGE_KEYS, where)
    role = value.get("role")
    if "role" not in value:
        problems.append(f"{where}: no 'role'")
    elif role not in ROLES:
        problems.append(f"{where}: unknown role {_show(role)} (expected system, user or assistant)")
    if "content" not in value:
        problems.append(f"{where}: no 'content'")
    elif not isinstance(value["content"], str):
        problems.append(f"{where}: 'content' must be a string, not {_kind(value['content'])}")
    weight = value.get("weight")
    if "weight" in value:
        if type(weight) is not int or weight not in (0, 1):
            problems.append(f"{where}: 'weight' must be 0 or 1, not {_show(weight)}")
        elif role in ROLES and role != "assistant":
            problems.append(f"{where}: 'weight' is for assistant turns only, not {role} turns")
    name = value.get("name")
    if "name" in value and not isinstance(name, str):
        problems.append(f"{where}: 'name' must be a string, not {_kind(name)}")
    if len(problems) > before:
        return None
    return Message(role=role, content=value["content"], weight=weight, name=name)


def _chat_example(
    value: dict[str, Any], line: int, set_by: int, problems: list[str]
) -> ChatExample | None:
    where = f"line {line}"
    if "messages" not in value:
        if "prompt" in value or "completion" in value:
            problems.append(
                f"{where}: a prompt/completion example in a chat file (line {set_by} set "
                "the format; one format per file)"
            )
        else:
            keys = ", ".join(repr(k) for k in value) or "none"
            problems.append(f"{where}: no 'messages' (keys: {keys})")
        return None
    before = len(problems)
    problems += _unknown_keys(value, CHAT_KEYS, where)
    raw = value["messages"]
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: 'messages' must be a non-empty list, not {_kind(raw)}")
        return None
    messages = [_message(m, f"{where}: message {i}", problems) for i, m in enumerate(raw, 1)]
    if len(problems) > before:
        return None
    turns = tuple(m for m in messages if m is not None)
    if not any(m.role == "assistant" for m in turns):
        problems.append(f"{where}: no assistant turn (nothing to learn)")
        return None
    if not any(m.learned for m in turns):
        problems.append(
            f"{where}: no assistant turn of weight 1 (every reply has weight 0: nothing to learn)"
        )
        return None
    return ChatExample(line=line, messages=turns)


def _completion_example(
    value: dict[str, Any], line: int, set_by: int, problems: list[str]
) -> CompletionExample | None:
    where = f"line {line}"
    if "messages" in value:
        problems.append(
            f"{where}: a chat example in a prompt/completion file (line {set_by} set the "
            "format; one format per file)"
        )
        return None
    before = len(problems)
    problems += _unknown_keys(value, COMPLETION_KEYS, where)
    for key in COMPLETION_KEYS:
        if key not in value:
            problems.append(f"{where}: no {key!r}")
        elif not isinstance(value[key], str):
            problems.append(f"{where}: {key!r} must be a string, not {_kind(value[key])}")
    if len(problems) == before and not value["completion"]:
        problems.append(f"{where}: 'completion' is empty (nothing to learn)")
    if len(problems) > before:
        return None
    return CompletionExample(line=line, prompt=value["prompt"], completion=value["completion"])


def _detect(rows: list[tuple[int, Any]]) -> tuple[Format | None, int]:
    """(format, the line that set it): the first object with "messages" or "prompt"."""
    for line, value in rows:
        if isinstance(value, dict) and "messages" in value:
            return "chat", line
        if isinstance(value, dict) and "prompt" in value:
            return "completion", line
    return None, 0


def _is_one_document(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def read_task_file(
    path: Path, *, count_tokens: TokenCounter | None = None, max_length: int | None = None
) -> TaskFile:
    """The file's usable examples, or a TaskFileError listing every problem (one per line).

    With `count_tokens` and `max_length` (they go together), examples over `max_length`
    tokens are dropped and reported in `TaskFile.notes`; fewer than MIN_EXAMPLES left is a
    problem. `count_tokens` may raise a JlserveError (e.g. a tokenizer without a chat
    template); that stops the read as it is."""
    if (count_tokens is None) != (max_length is None):
        raise ValueError("read_task_file: count_tokens and max_length go together")
    text = _read_text(path)
    rows: list[tuple[int, Any]] = []
    not_json: dict[int, str] = {}
    for line, raw in enumerate(text.split("\n"), start=1):  # JSON strings hold no raw \n
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw)))
        except json.JSONDecodeError as exc:
            not_json[line] = f"{exc.msg} at column {exc.colno}"
            rows.append((line, None))
    if not rows:
        raise TaskFileError(path, ["the file is empty (no examples)"])
    fmt, set_by = _detect(rows)
    if fmt is None and len(rows) > 1 and _is_one_document(text):
        raise TaskFileError(
            path, ["one JSON document, not JSON Lines: write one example object per line"]
        )
    problems: list[str] = []
    examples: list[Example] = []
    for line, value in rows:
        example: Example | None = None
        if line in not_json:
            problems.append(f"line {line}: not JSON ({not_json[line]})")
        elif not isinstance(value, dict):
            problems.append(f"line {line}: not a JSON object but {_kind(value)}")
        elif fmt == "chat":
            example = _chat_example(value, line, set_by, problems)
        elif fmt == "completion":
            example = _completion_example(value, line, set_by, problems)
        else:
            problems.append(
                f"line {line}: neither a chat example (no 'messages') nor a "
                "prompt/completion example (no 'prompt')"
            )
        if example is not None:
            examples.append(example)
    kept, dropped, notes = _drop_too_long(examples, count_tokens, max_length)
    if len(kept) < MIN_EXAMPLES:
        over = f" ({len(dropped)} over max_length {max_length} dropped)" if dropped else ""
        problems.insert(
            0, f"needs at least {MIN_EXAMPLES} usable examples, found {len(kept)}{over}"
        )
    if problems or fmt is None:  # no format: no examples, so problems is not empty
        raise TaskFileError(path, problems)
    return TaskFile(path, fmt, tuple(kept), tuple(dropped), tuple(notes))


def _drop_too_long(
    examples: list[Example], count_tokens: TokenCounter | None, max_length: int | None
) -> tuple[list[Example], list[int], list[str]]:
    """(kept examples, lines dropped, report lines) under the policy: over-long is dropped."""
    if count_tokens is None or max_length is None:
        return examples, [], []
    kept: list[Example] = []
    dropped: list[int] = []
    lines: list[str] = []
    for example in examples:
        tokens = count_tokens(example)
        if tokens > max_length:
            dropped.append(example.line)
            lines.append(f"line {example.line}: {tokens} tokens, over max_length {max_length}")
        else:
            kept.append(example)
    if not dropped:
        return kept, [], []
    head = (
        f"{len(dropped)} of {len(examples)} examples over max_length {max_length} tokens: "
        "dropped from training (never cut)"
    )
    return kept, dropped, [head, *_capped(lines, "dropped")]


class TaskSplitError(JlserveError):
    """Too few examples to hold a share out: the task needs a validation file."""


def held_out_size(
    n: int,
    *,
    share: float = HELD_OUT_SHARE,
    minimum: int = HELD_OUT_MIN,
    maximum: int = HELD_OUT_MAX,
) -> int:
    """How many of `n` examples a split holds out: `share` of them, within [minimum,
    maximum]. Refuses (TaskSplitError) when that leaves fewer than MIN_EXAMPLES to train on:
    a smaller file needs a validation file instead (the server checks an upload with it,
    so a job that would not split fails before it is queued)."""
    if not 0 < share < 1 or not 1 <= minimum <= maximum:
        raise ValueError(
            f"held-out split: needs 0 < share < 1 and 1 <= minimum <= maximum, got share "
            f"{share}, minimum {minimum}, maximum {maximum}"
        )
    size = min(maximum, max(minimum, round(share * n)))
    if n - size < MIN_EXAMPLES:
        raise TaskSplitError(
            f"{n} examples are too few to hold out {size} and keep {MIN_EXAMPLES} for "
            f"training (a split needs at least {size + MIN_EXAMPLES}): give a validation file"
        )
    return size
