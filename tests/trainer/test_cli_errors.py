"""Bad trainer inputs through the command line: one clear line on stderr, exit code 2,
no traceback, nothing trained. Malformed YAML, unknown keys, missing data files, unknown
task names, an empty task list and a task without rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main as trainer_main

CASES = {
    "malformed-yaml": ("model: [unclosed\n", "not valid YAML"),
    "unknown-key": ("model: {model}\nbogus: 1\ndata: {{root: {data}, tasks: [cb]}}\n", "bogus"),
    "unknown-nested-key": (
        "model: {model}\ndata: {{root: {data}, tasks: [cb], shuffle: true}}\n",
        "data.shuffle",
    ),
    "missing-data-dir": (
        "model: {model}\ndata: {{root: {data}/nowhere, tasks: [cb]}}\n",
        "no tasks.json there; get the benchmark with `jlserve data cl-benchmark",
    ),
    "missing-task-file": (
        "model: {model}\ndata: {{root: {data}, tasks: [nofiles]}}\n",
        "nofiles/train.json: cannot read",
    ),
    "unknown-task": ("model: {model}\ndata: {{root: {data}, tasks: [nope]}}\n", "'nope'"),
    "empty-tasks": ("model: {model}\ndata: {{root: {data}, tasks: []}}\n", "data.tasks"),
    "task-without-rows": ("model: {model}\ndata: {{root: {data}, tasks: [empty]}}\n", "no rows"),
    "missing-config": (None, "cannot read config"),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A CL-benchmark-shaped data dir: one good task, one with empty files, one without."""
    root = tmp_path_factory.mktemp("cl-data")
    tasks = {name: {"instruction": "x", "options": ["a", "b"]} for name in ("cb", "empty")}
    tasks["nofiles"] = {"instruction": "x", "options": ["a"]}
    (root / "tasks.json").write_text(json.dumps({"tasks": tasks, "orders": {"o": ["cb"]}}))
    for name, rows in (("cb", [{"sentence": "s", "label": "a"}]), ("empty", [])):
        (root / name).mkdir()
        for split in ("train", "dev"):
            (root / name / f"{split}.json").write_text(json.dumps(rows))
    return root


def write_config(tmp_path: Path, case: str, model: Path, data: Path) -> Path:
    path = tmp_path / f"{case}.yaml"
    template, _ = CASES[case]
    if template is not None:
        path.write_text(template.format(model=model, data=data))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, data_root, case, capsys):
    config = write_config(tmp_path, case, tiny_model_dir, data_root)
    out = tmp_path / "run"
    assert trainer_main(["--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error: "), err
    assert CASES[case][1] in err[0]
    assert not (out / "deltas").exists()


def test_jlserve_train_reports_the_same_way(tmp_path, tiny_model_dir, data_root):
    """The installed `jlserve train` entry point, in a real process."""
    config = write_config(tmp_path, "unknown-task", tiny_model_dir, data_root)
    done = subprocess.run(
        [sys.executable, "-m", "jlserve", "train", "--config", str(config), "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("jlserve: error: task 'nope'")
