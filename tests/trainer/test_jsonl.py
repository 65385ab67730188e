"""A user's JSONL task file (trainer/jsonl.py, docs/data.md): every bad file is refused with
the line it names and nothing else; good files come back typed; the held-out split; and
`jlserve data check FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jlserve.cli import main as jlserve_main
from trainer import jsonl
from trainer.errors import TrainerError
from trainer.jsonl import (
    ChatExample,
    CompletionExample,
    Message,
    TaskFileError,
    held_out_size,
    read_task_file,
    split_held_out,
    split_task,
    token_counter,
)

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


@pytest.mark.parametrize("case", BAD_CHAT)
def test_a_bad_chat_line_is_named_alone(tmp_path, case):
    bad, problem = BAD_CHAT[case]
    path = with_bad_line(tmp_path / "tasks.jsonl", bad)
    assert problems_of(path) == [problem]
    assert list(tmp_path.iterdir()) == [path]  # nothing written


@pytest.mark.parametrize("case", BAD_COMPLETION)
def test_a_bad_completion_line_is_named_alone(tmp_path, case):
    bad, problem = BAD_COMPLETION[case]
    path = with_bad_line(tmp_path / "tasks.jsonl", bad, make=completion)
    assert problems_of(path) == [problem]
    assert list(tmp_path.iterdir()) == [path]


def test_the_error_is_a_trainer_error_with_the_whole_report(tmp_path):
    path = with_bad_line(tmp_path / "t.jsonl", with_turn(2, role="bot"))
    with pytest.raises(TrainerError) as caught:
        read_task_file(path)
    assert str(caught.value) == (
        f"{path}: 1 problem:\n"
        "line 7: message 2: unknown role 'bot' (expected system, user or assistant)"
    )


def test_every_problem_of_a_line_is_listed(tmp_path):
    bad = turns({"role": "bot", "content": 1, "extra": 0}, REPLY)
    assert problems_of(with_bad_line(tmp_path / "t.jsonl", bad)) == [
        "line 7: message 1: unknown key 'extra' (allowed: role, content, weight, name)",
        "line 7: message 1: unknown role 'bot' (expected system, user or assistant)",
        "line 7: message 1: 'content' must be a string, not a number",
    ]


def test_not_utf8_is_one_problem(tmp_path):
    path = tmp_path / "t.jsonl"
    good = "\n".join(json.dumps(chat(i)) for i in range(12)).encode()
    path.write_bytes(good[:10] + b"\n\n\xff\xfe" + good[10:])
    assert problems_of(path) == ["not UTF-8 text (byte 0xff on line 3): JSON Lines files are UTF-8"]


def test_a_gzipped_file_is_not_utf8(tmp_path):
    import gzip

    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(good_file(tmp_path / "plain.jsonl").read_bytes()))
    (problem,) = problems_of(path)
    assert problem.startswith("not UTF-8 text (byte 0x8b on line 1)")


def test_a_file_over_the_size_limit_is_one_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_FILE_BYTES", 2**20)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b" " * (2**20 + 1))
    assert problems_of(path) == ["1,048,577 bytes, over the limit of 1,048,576 bytes (1 MiB)"]


def test_an_unreadable_path_is_one_problem(tmp_path):
    assert problems_of(tmp_path / "missing.jsonl") == ["cannot read (No such file or directory)"]


def test_an_empty_file(tmp_path):
    assert problems_of(write(tmp_path / "t.jsonl", ["", "  "])) == [
        "the file is empty (no examples)"
    ]


def test_one_json_document_is_not_json_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps([chat(i) for i in range(12)], indent=1))
    assert problems_of(path) == [
        "one JSON document, not JSON Lines: write one example object per line"
    ]


def test_neither_format(tmp_path):
    path = write(tmp_path / "t.jsonl", [json.dumps({"text": f"t {i}"}) for i in range(3)])
    assert problems_of(path) == [
        "needs at least 10 usable examples, found 0",
        *(
            f"line {i}: neither a chat example (no 'messages') nor a prompt/completion "
            "example (no 'prompt')"
            for i in (1, 2, 3)
        ),
    ]


def test_blank_lines_are_skipped_and_counted(tmp_path):
    """Blank lines (and CRLF endings, and a byte-order mark) are fine; line numbers are the
    file's own, blanks included."""
    lines = [json.dumps(chat(i)) for i in range(12)]
    lines[3:3] = ["", "   "]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    task = read_task_file(path)
    assert len(task.examples) == 12
    assert [e.line for e in task.examples][2:5] == [3, 6, 7]
    lines[6] = "[]"
    assert problems_of(write(path, lines)) == ["line 7: not a JSON object but an empty list"]


def test_the_report_shows_twenty_problems_then_counts_the_rest(tmp_path):
    lines = [json.dumps(chat(i)) for i in range(12)] + ["[]"] * 35
    with pytest.raises(TaskFileError) as caught:
        read_task_file(write(tmp_path / "t.jsonl", lines))
    report = caught.value.report
    assert caught.value.count == 35
    assert len(report) == 21
    assert report[0] == "line 13: not a JSON object but an empty list"
    assert report[19] == "line 32: not a JSON object but an empty list"
    assert report[20] == "... and 15 more problems"


def test_ten_usable_examples_are_needed(tmp_path):
    assert problems_of(good_file(tmp_path / "nine.jsonl", n=9)) == [
        "needs at least 10 usable examples, found 9"
    ]
    assert len(read_task_file(good_file(tmp_path / "ten.jsonl", n=10)).examples) == 10


def test_the_minimum_comes_first_and_counts_only_usable_examples(tmp_path):
    lines = [json.dumps(chat(i)) for i in range(10)]
    lines[4] = "nope"
    assert problems_of(write(tmp_path / "t.jsonl", lines)) == [
        "needs at least 10 usable examples, found 9",
        "line 5: not JSON (Expecting value at column 1)",
    ]


def test_mixed_formats_are_a_problem_per_line(tmp_path):
    lines = [json.dumps(completion(i)) for i in range(13)]
    lines[0] = "not json"  # the format is set by the first example, line 2
    lines[4] = json.dumps(chat(4))
    lines[9] = json.dumps(chat(9))
    assert problems_of(write(tmp_path / "t.jsonl", lines)) == [
        "line 1: not JSON (Expecting value at column 1)",
        *(
            f"line {i}: a chat example in a prompt/completion file (line 2 set the format; "
            "one format per file)"
            for i in (5, 10)
        ),
    ]


def test_a_valid_chat_file(tmp_path):
    lines = [json.dumps(chat(i)) for i in range(11)]
    lines.append(
        turns(
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "better"},
            {"role": "assistant", "content": "final", "weight": 1},
        )
    )
    task = read_task_file(write(tmp_path / "data.txt", lines))  # any name: content decides
    assert task.format == "chat"
    assert task.path == tmp_path / "data.txt"
    assert (task.dropped, task.notes) == ((), ())
    assert task.examples[0] == ChatExample(
        line=1,
        messages=(
            Message("system", "Answer in one word."),
            Message("user", "question 0"),
            Message("assistant", "answer 0"),
        ),
    )
    last = task.examples[-1]
    assert isinstance(last, ChatExample) and last.line == 12
    assert last.messages[0].name == "ann"
    assert [m.learned for m in last.messages] == [False, False, False, True]


def test_a_valid_completion_file(tmp_path):
    task = read_task_file(good_file(tmp_path / "t.jsonl", make=completion))
    assert task.format == "completion"
    assert task.examples[3] == CompletionExample(4, "question 3\nAnswer:", " answer 3")
    assert len(task.examples) == 12


def long_reply(i: int) -> dict:
    return chat(i, reply=" ".join(["the movie was good"] * 40))


def test_too_long_examples_are_dropped_and_reported(tmp_path):
    rows = [long_reply(i) if i in (2, 8) else chat(i) for i in range(12)]
    path = write(tmp_path / "t.jsonl", [json.dumps(r) for r in rows])
    words = lambda e: sum(len(m.content.split()) for m in e.messages)  # noqa: E731
    task = read_task_file(path, count_tokens=words, max_length=50)
    assert len(task.examples) == 10
    assert task.dropped == (3, 9)
    assert task.notes == (
        "2 of 12 examples over max_length 50 tokens: dropped from training (never cut)",
        "line 3: 166 tokens, over max_length 50",
        "line 9: 166 tokens, over max_length 50",
    )
    rows[5] = long_reply(5)
    path = write(path, [json.dumps(r) for r in rows])
    assert problems_of(path, count_tokens=words, max_length=50) == [
        "needs at least 10 usable examples, found 9 (3 over max_length 50 dropped)"
    ]
    with pytest.raises(TrainerError, match="go together"):
        read_task_file(path, max_length=50)


def test_held_out_sizes():
    assert held_out_size(30) == 20  # the minimum, leaving 10 to train on
    assert held_out_size(1_000) == 100  # 10 %
    assert held_out_size(100_000) == 500  # the maximum
    with pytest.raises(TrainerError) as caught:
        held_out_size(29)
    assert str(caught.value) == (
        "29 examples are too few to hold out 20 and keep 10 for training (a split needs at "
        "least 30): give a validation file"
    )
    for bad in ({"share": 0.0}, {"share": 1.0}, {"minimum": 0}, {"minimum": 9, "maximum": 8}):
        with pytest.raises(TrainerError, match="held-out split"):
            held_out_size(1_000, **bad)


def test_the_held_out_split_is_seeded_disjoint_and_in_order():
    rows = list(range(300))
    train, held = split_held_out(rows, seed=42)
    assert (len(train), len(held)) == (270, 30)
    assert sorted(train + held) == rows
    assert train == sorted(train) and held == sorted(held)
    assert split_held_out(rows, seed=42) == (train, held)
    assert split_held_out(rows, seed=43)[1] != held
    assert len(split_held_out(rows, seed=1, share=0.5, maximum=1_000)[1]) == 150


def test_a_validation_file_replaces_the_split(tmp_path):
    task = read_task_file(good_file(tmp_path / "train.jsonl", n=12))
    with pytest.raises(TrainerError, match="too few"):
        split_task(task, seed=0)
    validation = read_task_file(good_file(tmp_path / "dev.jsonl", n=10))
    train, held = split_task(task, seed=0, validation=validation)
    assert (train, held) == (list(task.examples), list(validation.examples))
    other = read_task_file(good_file(tmp_path / "c.jsonl", make=completion))
    with pytest.raises(TrainerError, match="completion format, but the task file"):
        split_task(task, seed=0, validation=other)
    big = read_task_file(good_file(tmp_path / "big.jsonl", n=40))
    assert [len(part) for part in split_task(big, seed=0)] == [20, 20]


def run_check(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    code = jlserve_main(["data", "check", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_check_a_good_chat_file(tmp_path, capsys):
    path = good_file(tmp_path / "t.jsonl", n=30)
    code, out, err = run_check(capsys, str(path))
    assert (code, err) == (0, [])
    assert out == [
        f"{path}: chat format, 30 examples; turns: system 30, user 30, assistant 30",
        f"{path}: lengths not checked (give --model DIR to count tokens)",
        f"{path}: ok, chat format, 30 examples (30 assistant turns), 20 would be held out",
    ]


def test_check_a_small_completion_file(tmp_path, capsys):
    path = good_file(tmp_path / "t.jsonl", make=completion)
    code, out, _ = run_check(capsys, str(path))
    assert code == 0
    assert out[-1] == (
        f"{path}: ok, completion format, 12 examples, none held out: 12 examples are too few "
        "to hold out 20 and keep 10 for training (a split needs at least 30): give a "
        "validation file"
    )


def test_check_a_bad_file(tmp_path, capsys):
    path = with_bad_line(tmp_path / "t.jsonl", with_turn(2, role="bot"))
    code, out, err = run_check(capsys, str(path))
    assert (code, out) == (1, [])
    assert err == [
        "line 7: message 2: unknown role 'bot' (expected system, user or assistant)",
        f"{path}: 1 problem",
    ]


def test_check_still_takes_a_root_and_refuses_file_flags_there(tmp_path, capsys):
    code, _, err = run_check(capsys, str(tmp_path))
    assert code == 1 and "tasks.json" in err[0]
    code, _, err = run_check(capsys, str(tmp_path), "--max-length", "64")
    assert code == 2
    assert err == [
        f"jlserve: error: {tmp_path}: --model and --max-length are for a JSONL task file"
    ]
    code, _, err = run_check(capsys, str(tmp_path / "typo.jsonl"))
    assert code == 1
    assert err == [f"{tmp_path / 'typo.jsonl'}: no such data root directory or JSONL task file"]


def test_check_lengths_with_a_model(tmp_path, capsys, tiny_model_dir):
    rows = [long_reply(i) if i in (2, 8) else chat(i) for i in range(12)]
    path = write(tmp_path / "t.jsonl", [json.dumps(r) for r in rows])
    code, out, err = run_check(
        capsys, str(path), "--model", str(tiny_model_dir), "--max-length", "64"
    )
    assert (code, err) == (0, [])
    assert out[1] == (
        f"{path}: 2 of 12 examples over max_length 64 tokens: dropped from training (never cut)"
    )
    assert [line.split(":")[1] for line in out[2:4]] == [" line 3", " line 9"]
    assert out[-1] == (
        f"{path}: ok, chat format, 10 examples (10 assistant turns), none held out: 10 "
        "examples are too few to hold out 20 and keep 10 for training (a split needs at "
        "least 30): give a validation file"
    )
    rows[5] = long_reply(5)
    write(path, [json.dumps(r) for r in rows])
    code, _, err = run_check(
        capsys, str(path), "--model", str(tiny_model_dir), "--max-length", "64"
    )
    assert code == 1
    assert err[0] == "needs at least 10 usable examples, found 9 (3 over max_length 64 dropped)"


def test_token_counts_follow_the_template_and_the_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    count = token_counter(tok)
    short = ChatExample(1, (Message("user", "good"), Message("assistant", "bad")))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "good"}, {"role": "assistant", "content": "bad"}],
        tokenize=False,
    )
    assert count(short) == len(tok(text, add_special_tokens=False)["input_ids"])
    pair = CompletionExample(1, "good", " bad")
    assert (
        count(pair)
        == len(tok("good", add_special_tokens=False)["input_ids"])
        + len(tok(" bad", add_special_tokens=False)["input_ids"])
        + 1
    )
    tok.chat_template = None
    with pytest.raises(TrainerError, match="no chat template"):
        count(short)


def test_check_a_completion_file_with_a_model(tmp_path, capsys, tiny_model_dir):
    path = good_file(tmp_path / "t.jsonl", make=completion)
    code, out, _ = run_check(capsys, str(path), "--model", str(tiny_model_dir))
    assert code == 0
    assert out[0].startswith(f"{path}: ok, completion format, 12 examples, none held out")
    code, _, err = run_check(capsys, str(path), "--model", str(tmp_path / "nowhere"))
    assert code == 2
    assert err == [f"jlserve: error: --model {tmp_path / 'nowhere'}: not a directory"]
