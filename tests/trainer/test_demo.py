"""`make demo`'s script end to end on the tiny model, and the pip-built demo data."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from jlserve.taskfile import read_task_file
from tests.conftest import REPO_ROOT, TWO_TASKS
from trainer.demo import main
from trainer.demo_data import CHAT_ORDER, DEMO_ORDER, build_demo_benchmark, build_demo_task_files


@pytest.mark.slow
def test_demo_feeds_chat_task_files_to_a_live_run_and_server(tiny_model_dir, tmp_path, capsys):
    """`make demo --quick` on the tiny model: chat JSONL files arrive one at a time through
    the append path, each hot-swapped in and asked through /v1/chat/completions."""
    out = tmp_path / "demo"
    argv = ["--quick", "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "served scores" in printed and "swap s" in printed and "ROUGE-L" in printed
    assert printed.count("jlserve learn --out") == 2 and "news_headline.valid.jsonl" in printed
    assert "4. ask" in printed and "/v1/chat/completions" in printed
    assert "   review_sentiment: " in printed and "   news_headline: " in printed
    assert "report:" in printed and (out / "run" / "report.md").is_file()
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert [t["task"] for t in metrics["tasks"]] == ["review_sentiment", "news_headline"]
    assert metrics["task_metrics"] == {"review_sentiment": "exact", "news_headline": "rougeL"}
    assert all(t["swap_s"] > 0 for t in metrics["tasks"])  # each delta was hot-swapped
    run = json.loads((out / "run" / "run.json").read_text())
    assert [a["name"] for a in run["appended"]] == ["review_sentiment", "news_headline"]


@pytest.mark.slow
def test_demo_takes_task_folders_and_replaces_only_its_own_directory(
    tiny_model_dir, cl_data_root, tmp_path, capsys
):
    out = tmp_path / "demo"
    argv = ["--quick", "--model", str(tiny_model_dir), "--data", str(cl_data_root),
            "--tasks", *TWO_TASKS, "--out", str(out)]  # fmt: skip
    out.mkdir()
    (out / ".jlserve-demo").touch()  # a previous demo's directory is replaced
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"   {TWO_TASKS[0]}: " in printed and f"│ {TWO_TASKS[1]}" in printed
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["config"]["data"]["prompt_format"] == "chat" and run["tasks"] == list(TWO_TASKS)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main([*argv[:-1], str(foreign)]) == 2
    assert (foreign / "keep.txt").is_file()


def test_demo_task_files_are_valid_chat_files(tmp_path):
    files = build_demo_task_files(
        tmp_path, cache_dir=REPO_ROOT / ".cache", train_rows=24, dev_rows=12
    )
    assert list(files) == CHAT_ORDER
    for train, valid in files.values():
        examples = read_task_file(train).examples
        assert len(examples) == 24 and len(read_task_file(valid).examples) == 12
        assert read_task_file(train).format == "chat"
        assert examples[0].messages[-1].role == "assistant"
    headlines = {e.messages[-1].content for e in read_task_file(files["news_headline"][0]).examples}
    assert len(headlines) == 24  # free-form: every answer differs


def test_demo_data_from_pip_packages(tmp_path):
    root = build_demo_benchmark(
        tmp_path / "data", cache_dir=REPO_ROOT / ".cache", train_rows=40, dev_rows=10
    )
    tasks = json.loads((root / "tasks.json").read_text())
    assert tasks["orders"]["demo"] == DEMO_ORDER
    for name in DEMO_ORDER:
        train = json.loads((root / name / "train.json").read_text())
        dev = json.loads((root / name / "dev.json").read_text())
        assert len(train) == 40 and len(dev) == 10
        assert not {r["sentence"] for r in train} & {r["sentence"] for r in dev}
        counts = Counter(r["label"] for r in train)
        assert set(counts) == set(tasks["tasks"][name]["options"])
        assert max(counts.values()) - min(counts.values()) <= 2  # balanced
