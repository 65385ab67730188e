"""The task file format (jlserve/taskfile.py, docs/data.md): every bad file is refused with
the line it names and nothing else; good files come back typed."""

from __future__ import annotations

import json

import pytest

from jlserve import taskfile
from jlserve.errors import JlserveError
from jlserve.taskfile import (
    ChatExample,
    CompletionExample,
    Message,
    TaskFileError,
    TaskSplitError,
    held_out_size,
    read_task_file,
)
from tests.helpers.taskfiles import (
    BAD_CHAT,
    BAD_COMPLETION,
    REPLY,
    chat,
    completion,
    good_file,
    long_reply,
    problems_of,
    turns,
    with_bad_line,
    with_turn,
    write,
)


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


def test_the_error_is_one_jlserve_error_with_the_whole_report(tmp_path):
    path = with_bad_line(tmp_path / "t.jsonl", with_turn(2, role="bot"))
    with pytest.raises(JlserveError) as caught:
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

    path = tmp_path / "t.taskfile.gz"
    path.write_bytes(gzip.compress(good_file(tmp_path / "plain.jsonl").read_bytes()))
    (problem,) = problems_of(path)
    assert problem.startswith("not UTF-8 text (byte 0x8b on line 1)")


def test_a_file_over_the_size_limit_is_one_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(taskfile, "MAX_FILE_BYTES", 2**20)
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
    with pytest.raises(ValueError, match="go together"):
        read_task_file(path, max_length=50)


def test_held_out_sizes():
    assert held_out_size(30) == 20  # the minimum, leaving 10 to train on
    assert held_out_size(1_000) == 100  # 10 %
    assert held_out_size(100_000) == 500  # the maximum
    with pytest.raises(TaskSplitError) as caught:
        held_out_size(29)
    assert str(caught.value) == (
        "29 examples are too few to hold out 20 and keep 10 for training (a split needs at "
        "least 30): give a validation file"
    )
    for bad in ({"share": 0.0}, {"share": 1.0}, {"minimum": 0}, {"minimum": 9, "maximum": 8}):
        with pytest.raises(ValueError, match="held-out split"):
            held_out_size(1_000, **bad)
