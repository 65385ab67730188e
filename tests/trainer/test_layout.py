"""`jlserve data check ROOT`: every problem of a data root, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jlserve.cli import main as jlserve_main
from tests.conftest import CL_BENCHMARK_DIR, needs_cl_benchmark
from trainer.layout import check_root


def make_root(root: Path) -> Path:
    """A valid two-task root in the layout of docs/data.md."""
    tasks = {
        "sent": {"instruction": "Sentiment?", "options": ["Good", "Bad"]},
        "topic": {"instruction": "Topic?", "options": ["World", "Sports"]},
    }
    (root / "tasks.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "tasks.json").write_text(
        json.dumps({"tasks": tasks, "orders": {"mine": ["sent", "topic"]}})
    )
    for name, spec in tasks.items():
        (root / name).mkdir()
        (root / name / "labels.json").write_text(json.dumps(spec["options"]))
        for split in ("train", "dev"):
            rows = [{"sentence": f"{name} {i}", "label": spec["options"][i % 2]} for i in range(4)]
            (root / name / f"{split}.json").write_text(json.dumps(rows))
    return root


def _edit_index(root: Path, change) -> None:
    index = json.loads((root / "tasks.json").read_text())
    change(index)
    (root / "tasks.json").write_text(json.dumps(index))


def _relabel(root: Path) -> None:
    rows = json.loads((root / "topic" / "dev.json").read_text())
    rows[1]["label"] = "Weather"
    (root / "topic" / "dev.json").write_text(json.dumps(rows))


DEFECTS = {  # name -> (how to break a valid root, what its one line must say)
    "missing split": (lambda r: (r / "sent" / "dev.json").unlink(), "sent/dev.json: missing"),
    "unknown label": (_relabel, "topic/dev.json: 1 rows have a label that is not among"),
    "empty task": (lambda r: (r / "topic" / "train.json").write_text("[]"), "no rows"),
    "bad order": (
        lambda r: _edit_index(r, lambda i: i["orders"].update(bad=["sent", "nope"])),
        "order 'bad': names tasks that tasks.json does not define: ['nope']",
    ),
    "bad row": (
        lambda r: (r / "sent" / "train.json").write_text('[{"text": "x"}]'),
        "sent/train.json: row 0 is not",
    ),
    "labels.json differs": (
        lambda r: (r / "sent" / "labels.json").write_text('["Bad", "Good"]'),
        "sent/labels.json: ['Bad', 'Good'] differs",
    ),
    "bad options": (
        lambda r: _edit_index(r, lambda i: i["tasks"]["topic"].update(options=[])),
        "task 'topic': 'options' must be a non-empty list",
    ),
}


def test_a_valid_root_passes(tmp_path, capsys):
    root = make_root(tmp_path / "root")
    assert check_root(root) == []
    assert jlserve_main(["data", "check", str(root)]) == 0
    assert "ok, 2 tasks, orders: mine" in capsys.readouterr().out


@needs_cl_benchmark
def test_the_benchmark_copy_passes():
    assert check_root(CL_BENCHMARK_DIR) == []


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_is_one_line(tmp_path, defect):
    root = make_root(tmp_path / "root")
    breaks, message = DEFECTS[defect]
    breaks(root)
    problems = check_root(root)
    assert len(problems) == 1, problems
    assert message in problems[0]


def test_all_defects_at_once_through_the_cli(tmp_path, capsys):
    root = make_root(tmp_path / "root")
    for defect in ("missing split", "unknown label", "empty task", "bad order"):
        DEFECTS[defect][0](root)
    assert jlserve_main(["data", "check", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and err[-1].endswith(": 4 problems")
    for defect in ("missing split", "unknown label", "empty task", "bad order"):
        assert sum(DEFECTS[defect][1] in line for line in err[:4]) == 1, defect


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (None, "tasks.json: cannot read"),
        ("{not json", "tasks.json: not valid JSON"),
        ("[]", "tasks.json: expected {"),
        ('{"tasks": {}, "orders": {}}', "defines no tasks"),
    ],
)
def test_a_broken_index_is_one_line(tmp_path, index, message):
    root = tmp_path / "root"
    root.mkdir()
    if index is not None:
        (root / "tasks.json").write_text(index)
    problems = check_root(root)
    assert len(problems) == 1 and message in problems[0]
    [missing] = check_root(tmp_path / "nowhere")
    assert missing.startswith(f"{tmp_path / 'nowhere'}: not a directory (for the CL benchmark: ")
