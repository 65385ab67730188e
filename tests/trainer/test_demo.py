"""`make demo`'s script end to end on the tiny model, and the pip-built demo data."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import REPO_ROOT
from trainer.demo import main
from trainer.demo_data import DEMO_ORDER, build_demo_benchmark


@pytest.mark.slow
def test_demo_serves_learns_and_reports(tiny_model_dir, cl_data_root, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--quick", "--model", str(tiny_model_dir), "--data", str(cl_data_root),
            "--tasks", "movie_sentiment", "tweet_sentiment", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "served accuracy" in printed and "swap s" in printed and "│ tweet_sentiment" in printed
    assert "report:" in printed and (out / "run" / "report.md").is_file()
    # Taught and asked in the chat format: one question per task through the chat endpoint.
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["config"]["data"]["prompt_format"] == "chat"
    assert "4. ask" in printed and "/v1/chat/completions" in printed
    assert "   movie_sentiment: '" in printed and "   tweet_sentiment: '" in printed
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert [t["task"] for t in metrics["tasks"]] == ["movie_sentiment", "tweet_sentiment"]
    assert all(t["swap_s"] > 0 for t in metrics["tasks"])  # each delta was hot-swapped
    # A re-run replaces its own directory, never someone else's.
    assert main(argv) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main([*argv[:-1], str(foreign)]) == 2
    assert (foreign / "keep.txt").is_file()


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
