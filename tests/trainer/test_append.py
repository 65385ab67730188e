"""Tasks arrive (trainer/append.py): `--add-task` on the tiny model, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jlserve.cli import main as jlserve_main
from tests.conftest import TWO_TASKS
from trainer.cli import main as trainer_main

THIRD = "bbc_topic"


def _config(tmp_path: Path, model: Path, data: Path, method: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model: {model}\n"
        f"data: {{root: {data}, tasks: [{', '.join(TWO_TASKS)}], train_rows: 8, eval_rows: 4,"
        " max_length: 96}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
        f"method: {json.dumps(method)}\n"
    )
    return path


def _chain(run: Path) -> list[tuple[int, str | None, str]]:
    info = json.loads((run / "run.json").read_text())
    return [(v["version"], v["task"], v["fingerprint"]) for v in info["versions"]]


METHODS = {
    "incLoRA+jump": ({"name": "incLoRA"}, "jump"),
    "incLoRA": ({"name": "incLoRA"}, "none"),
    "seqLoRA+jump": ({"name": "seqLoRA"}, "jump"),
    "ella+jump": ({"name": "ella"}, "jump"),
    "olora+jump": ({"name": "olora"}, "jump"),
    # InfLoRA's threshold ramps over the stream known when a task trains: constant here so
    # that a 2-task run plus one equals a 3-task run (docs/trainer.md, "Tasks arrive").
    "inflora+jump": ({"name": "inflora", "inflora_threshold_end": 0.95}, "jump"),
}


@pytest.mark.parametrize("variant", sorted(METHODS))
def test_two_tasks_plus_an_appended_one_equal_a_three_task_run(
    tmp_path, tiny_model_dir, cl_data_root, variant
) -> None:
    method, gate = METHODS[variant]
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, method)
    gate_set = ["--set", f"adapter.gate={gate}"]
    three = ["--set", f"data.tasks=[{', '.join(TWO_TASKS)}, {THIRD}]"]
    fixed, grown = tmp_path / "fixed", tmp_path / "grown"
    assert trainer_main(["--config", str(cfg), "--out", str(fixed), *gate_set, *three]) == 0
    assert trainer_main(["--config", str(cfg), "--out", str(grown), *gate_set]) == 0
    add = ["--out", str(grown), "--add-task", f"{THIRD}={cl_data_root / THIRD}"]
    assert jlserve_main(["learn", *add]) == 0
    assert _chain(grown) == _chain(fixed)  # same versions, same weights
    grown_acc = json.loads((grown / "metrics.json").read_text())["accuracy"]
    fixed_acc = json.loads((fixed / "metrics.json").read_text())["accuracy"]
    assert grown_acc["tasks"] == [*TWO_TASKS, THIRD]
    for key in ("matrix", "base", "OA", "BWT", "FWT"):  # the matrix grew a row and a column
        assert grown_acc[key] == fixed_acc[key], key
    grown_loss = json.loads((grown / "metrics.json").read_text())["loss"]
    assert grown_loss == json.loads((fixed / "metrics.json").read_text())["loss"]


@pytest.mark.slow
def test_on_smollm2_two_tasks_plus_an_appended_one_equal_a_three_task_run(
    tmp_path, smollm2_dir, cl_data_root
) -> None:
    """The default model and method (incLoRA + the learned gate), a few steps per task."""
    cfg = _config(tmp_path, smollm2_dir, cl_data_root, {"name": "incLoRA"})
    three = ["--set", f"data.tasks=[{', '.join(TWO_TASKS)}, {THIRD}]"]
    fixed, grown = tmp_path / "fixed", tmp_path / "grown"
    assert trainer_main(["--config", str(cfg), "--out", str(fixed), *three]) == 0
    assert trainer_main(["--config", str(cfg), "--out", str(grown)]) == 0
    add = ["--out", str(grown), "--add-task", f"{THIRD}={cl_data_root / THIRD}"]
    assert jlserve_main(["learn", *add]) == 0
    assert _chain(grown) == _chain(fixed)
    grown_metrics = json.loads((grown / "metrics.json").read_text())
    fixed_metrics = json.loads((fixed / "metrics.json").read_text())
    assert grown_metrics["accuracy"]["tasks"] == [*TWO_TASKS, THIRD]
    assert grown_metrics["accuracy"]["matrix"] == fixed_metrics["accuracy"]["matrix"]
    assert grown_metrics["loss"] == fixed_metrics["loss"]


def test_a_run_of_added_tasks_grows_and_refuses_what_would_break_its_chain(
    tmp_path, tiny_model_dir, cl_data_root, capsys
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, {"name": "incLoRA"})
    run = tmp_path / "run"
    first = [f"--add-task={name}={cl_data_root / name}" for name in TWO_TASKS]
    assert trainer_main(["--config", str(cfg), "--out", str(run), *first]) == 0
    assert "data.tasks of the config is not used" in capsys.readouterr().err
    info = json.loads((run / "run.json").read_text())
    assert info["tasks"] == list(TWO_TASKS) and info["completed"] == 2
    assert info["config"]["data"]["tasks"] is None  # the stream is the added tasks only
    assert sorted(p.name for p in (run / "tasks").iterdir()) == sorted([*TWO_TASKS, "tasks.json"])

    def refused(*args: str, message: str) -> None:
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert trainer_main(["--out", str(run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    third = f"{THIRD}={cl_data_root / THIRD}"
    refused("--add-task", f"{TWO_TASKS[0]}={cl_data_root / THIRD}", message="already has a task")
    refused("--add-task", third, "--set", "method.name=ella", message="method.name")
    refused("--add-task", third, "--set", "adapter.r=4", message="adapter.r")
    refused("--add-task", third, "--set", f"model={tmp_path}", message="model")
    refused(
        "--add-task",
        f"x={tmp_path / 'nowhere'}",
        message="neither a JSONL task file nor a task folder",
    )
    refused("--add-task", "no-equals-sign", message="NAME=PATH")
    refused("--add-task", third, "--add-task", third, message="given twice")
    # A later call needs only --out and the task; its own settings are recorded.
    assert trainer_main(["--out", str(run), "--add-task", third, "--set", "train.lr=0.002"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["tasks"] == [*TWO_TASKS, THIRD] and info["completed"] == 3
    assert info["appended"][-1] == {
        "name": THIRD,
        "source": str((cl_data_root / THIRD).resolve()),
        "settings": {"train.lr": 0.002},
    }
    acc = json.loads((run / "metrics.json").read_text())["accuracy"]
    assert all(b is not None for b in acc["base"]) and acc["matrix"][1][2] is not None


def test_an_interrupted_append_keeps_every_version_and_resume_finishes_it(
    tmp_path, tiny_model_dir, cl_data_root, monkeypatch
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, {"name": "ella"})
    fixed, run = tmp_path / "fixed", tmp_path / "run"
    three = ["--set", f"data.tasks=[{', '.join(TWO_TASKS)}, {THIRD}]"]
    assert trainer_main(["--config", str(cfg), "--out", str(fixed), *three]) == 0
    assert trainer_main(["--config", str(cfg), "--out", str(run)]) == 0
    kept = {p: p.read_bytes() for sub in ("deltas", "merged", "state") for p in (run / sub).rglob("*") if p.is_file()}  # fmt: skip
    import trainer.loop

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer.loop, "train_step", crash)
        with pytest.raises(KeyboardInterrupt):
            trainer_main(["--out", str(run), "--add-task", f"{THIRD}={cl_data_root / THIRD}"])
    now = {p: p.read_bytes() for sub in ("deltas", "merged", "state") for p in (run / sub).rglob("*") if p.is_file()}  # fmt: skip
    assert now == kept  # every version as it was
    info = json.loads((run / "run.json").read_text())
    assert info["completed"] == 2 and info["tasks"][-1] == THIRD  # the task is pending
    assert trainer_main(["--config", str(cfg), "--out", str(run), "--resume"]) == 0
    assert _chain(run) == _chain(fixed)


def test_a_task_with_its_own_seed_trains_and_holds_out_by_that_seed(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    """train.seed is a per-task setting (a fine-tuning job's `seed`): the same seed gives
    the same version, another seed another one, and the earlier versions stay as they are."""
    import shutil

    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, {"name": "incLoRA"})
    base = tmp_path / "base"
    assert trainer_main(["--config", str(cfg), "--out", str(base)]) == 0
    third = ["--add-task", f"{THIRD}={cl_data_root / THIRD}"]
    chains = {}
    for name, seed in (("default", None), ("seven", 7), ("seven-again", 7)):
        run = tmp_path / name
        shutil.copytree(base, run)
        own = ["--set", f"train.seed={seed}"] if seed is not None else []
        assert trainer_main(["--out", str(run), *third, *own]) == 0
        info = json.loads((run / "run.json").read_text())
        assert info["appended"][-1]["settings"] == ({"train.seed": seed} if seed else {})
        assert info["config"]["train"]["seed"] != 7  # the run's seed is unchanged
        chains[name] = _chain(run)
    assert chains["seven"] == chains["seven-again"]
    assert chains["seven"][:3] == chains["default"][:3]  # versions 0-2 as they were
    assert chains["seven"][3] != chains["default"][3]
