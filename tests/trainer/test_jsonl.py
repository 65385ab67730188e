"""A task file for training (trainer/jsonl.py, docs/data.md): token counts, the held-out
split, and `jlserve data check FILE`. The format's checks: tests/jlserve/test_taskfile.py."""

from __future__ import annotations

import json

import pytest

from jlserve.cli import main as jlserve_main
from jlserve.errors import JlserveError
from jlserve.taskfile import ChatExample, CompletionExample, Message, read_task_file
from tests.helpers.taskfiles import (
    chat,
    completion,
    good_file,
    long_reply,
    with_bad_line,
    with_turn,
    write,
)
from trainer.errors import TrainerError
from trainer.jsonl import split_held_out, split_task, token_counter


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
    with pytest.raises(JlserveError, match="too few"):
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
