"""Task files the tests write: good ones, and good ones with one broken line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jlserve.taskfile import MIN_EXAMPLES, TaskFileError, read_task_file

BAD_LINE = 7  # where each broken example goes, among 11 good ones


def chat(i: int, reply: str | None = None) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": reply or f"answer {i}"},
        ]
    }


def completion(i: int) -> dict:
    return {"prompt": f"question {i}\nAnswer:", "completion": f" answer {i}"}


def with_turn(index: int, **changes) -> str:
    """A chat example whose message `index` (1-based) has `changes` (None: key removed)."""
    example = chat(0)
    message = example["messages"][index - 1]
    for key, value in changes.items():
        if value is None:
            message.pop(key)
        else:
            message[key] = value
    return json.dumps(example)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def good_file(path: Path, make=chat, n: int = 12) -> Path:
    return write(path, [json.dumps(make(i)) for i in range(n)])


def with_bad_line(path: Path, bad: str, make=chat) -> Path:
    lines = [json.dumps(make(i)) for i in range(12)]
    lines[BAD_LINE - 1] = bad
    return write(path, lines)


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(TaskFileError) as caught:
        read_task_file(path, **kwargs)
    return caught.value.report


def turns(*messages: object) -> str:
    return json.dumps({"messages": list(messages)})


USER = {"role": "user", "content": "q"}
REPLY = {"role": "assistant", "content": "a"}

BAD_CHAT = {  # the broken line 7 of a chat file -> its one problem line
    "not JSON": ('{"messages": [', "line 7: not JSON (Expecting value at column 15)"),
    "not an object": ("[1, 2]", "line 7: not a JSON object but a list"),
    "no messages": ('{"msgs": []}', "line 7: no 'messages' (keys: 'msgs')"),
    "messages not a list": (
        '{"messages": "hi"}',
        "line 7: 'messages' must be a non-empty list, not a string",
    ),
    "messages empty": (
        '{"messages": []}',
        "line 7: 'messages' must be a non-empty list, not an empty list",
    ),
    "message not an object": (
        turns("hi", USER, REPLY),
        "line 7: message 1: not a JSON object but a string",
    ),
    "unknown role": (
        with_turn(2, role="bot"),
        "line 7: message 2: unknown role 'bot' (expected system, user or assistant)",
    ),
    "no role": (with_turn(2, role=None), "line 7: message 2: no 'role'"),
    "no content": (with_turn(3, content=None), "line 7: message 3: no 'content'"),
    "content not a string": (
        turns(USER, {"role": "assistant", "content": ["a"]}),
        "line 7: message 2: 'content' must be a string, not a list",
    ),
    "content null": (
        turns(USER, {"role": "assistant", "content": None}),
        "line 7: message 2: 'content' must be a string, not null",
    ),
    "weight 2": (with_turn(3, weight=2), "line 7: message 3: 'weight' must be 0 or 1, not 2"),
    "weight 0.5": (with_turn(3, weight=0.5), "line 7: message 3: 'weight' must be 0 or 1, not 0.5"),
    "weight true": (
        with_turn(3, weight=True),
        "line 7: message 3: 'weight' must be 0 or 1, not true",
    ),
    "weight on a user turn": (
        with_turn(2, weight=1),
        "line 7: message 2: 'weight' is for assistant turns only, not user turns",
    ),
    "no assistant turn": (turns(USER), "line 7: no assistant turn (nothing to learn)"),
    "only weight-0 replies": (
        with_turn(3, weight=0),
        "line 7: no assistant turn of weight 1 (every reply has weight 0: nothing to learn)",
    ),
    "unknown top-level key": (
        json.dumps({**chat(0), "tools": []}),
        "line 7: unknown key 'tools' (allowed: messages)",
    ),
    "unknown message key": (
        with_turn(3, tool_calls=[]),
        "line 7: message 3: unknown key 'tool_calls' (allowed: role, content, weight, name)",
    ),
    "name not a string": (
        with_turn(2, name=5),
        "line 7: message 2: 'name' must be a string, not a number",
    ),
    "a completion example": (
        json.dumps(completion(0)),
        "line 7: a prompt/completion example in a chat file (line 1 set the format; one "
        "format per file)",
    ),
}

BAD_COMPLETION = {  # the broken line 7 of a prompt/completion file -> its one problem line
    "no completion": ('{"prompt": "q"}', "line 7: no 'completion'"),
    "no prompt": ('{"completion": "a"}', "line 7: no 'prompt'"),
    "prompt not a string": (
        '{"prompt": 3, "completion": "a"}',
        "line 7: 'prompt' must be a string, not a number",
    ),
    "empty completion": (
        '{"prompt": "q", "completion": ""}',
        "line 7: 'completion' is empty (nothing to learn)",
    ),
    "unknown key": (
        '{"prompt": "q", "completion": "a", "id": 1}',
        "line 7: unknown key 'id' (allowed: prompt, completion)",
    ),
    "a chat example": (
        json.dumps(chat(0)),
        "line 7: a chat example in a prompt/completion file (line 1 set the format; one "
        "format per file)",
    ),
}


def long_reply(i: int) -> dict:
    return chat(i, reply=" ".join(["the movie was good"] * 40))


def cl_rows(root: Path, task: str) -> list[dict[str, str]]:
    """Every row (train and dev) of a task in the CL layout."""
    return [r for split in ("train", "dev") for r in json.loads((root / task / f"{split}.json").read_text())]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_sentiment(root: Path, out: Path) -> Path:
    """tweet_sentiment as OpenAI chat fine-tuning lines: a classification by chat."""
    return write_jsonl(out, [
        {"messages": [
            {"role": "system", "content": "Answer Positive or Negative."},
            {"role": "user", "content": r["sentence"]},
            {"role": "assistant", "content": r["label"]},
        ]}
        for r in cl_rows(root, "movie_sentiment")
    ])  # fmt: skip


def completion_titles(root: Path, out: Path) -> Path:
    """BBC articles -> their title, as prompt/completion lines: a free-form task."""
    rows = []
    for r in cl_rows(root, "bbc_topic"):
        title, _, text = r["sentence"].partition("\nText: ")
        rows.append({"prompt": f"Article: {text[:120]}\nTitle:", "completion": " " + title[7:]})
    return write_jsonl(out, rows)


def smallest_job_files(path: Path) -> tuple[Path, Path]:
    """(training file, validation file) from a task file: the smallest files a job takes
    (2 training steps of 8 on CPU, 10 held-out rows), so a test stays within minutes."""
    lines = path.read_text().splitlines()
    train, valid = path.with_suffix(".train.jsonl"), path.with_suffix(".valid.jsonl")
    train.write_text("\n".join(lines[:12]) + "\n")
    valid.write_text("\n".join(lines[-MIN_EXAMPLES:]) + "\n")
    return train, valid
