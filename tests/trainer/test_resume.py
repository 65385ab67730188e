"""`--resume` refuses a run it could not continue exactly (docs/trainer.md, "Run directory"):
a config that differs from the one run.json records, or a base model whose fingerprint
differs. Through the CLI on the tiny model: exit 2, one error line naming the problem, and
not one byte of the run directory changed; the unchanged command then resumes (the
control: the refusal is not a resume that fails anyway)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jlserve.checkpoint import fingerprint, load_tensors
from jlserve.models.tiny import TinyLlamaSpec, build_tiny_llama
from tests.helpers.cl_stream import ORDER, write_stream
from trainer.cli import main as trainer_main


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file and directory under the run directory, by relative path, with the
    file's bytes: a deleted, added or rewritten file (or directory) changes it."""
    return {
        str(p.relative_to(run)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(run.rglob("*"))
    }


@pytest.fixture
def stopped_run(tmp_path, tiny_model_dir) -> dict[str, Path]:
    """A two-task run stopped after task 1, on a private copy of the tiny base (which the
    base-model test replaces), with a half-written file of task 2."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = write_stream(tmp_path / "data")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {model}\n"
        f"data: {{root: {data}, order: {ORDER}, train_rows: 8, eval_rows: 4, max_length: 64}}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
    )
    run = tmp_path / "run"
    assert trainer_main(["--config", str(cfg), "--out", str(run), "--stop-after", "1"]) == 0
    assert json.loads((run / "run.json").read_text())["completed"] == 1
    # As if killed while writing task 2: a file run.json does not name, which an accepted
    # resume deletes, so a refusal that came after that clean-up would show.
    (run / "deltas" / "task002-moods.safetensors").write_bytes(b"half-written")
    return {"model": model, "cfg": cfg, "run": run}


def _resume_is_refused(run: Path, args: list[str], capsys, problem: str) -> None:
    before = _snapshot(run)
    capsys.readouterr()  # drop what the first run printed
    assert trainer_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    # One error line, the last; before it only the model loader's progress bar (the
    # refusal comes after the base model is loaded: its fingerprint is compared).
    lines = err.strip().splitlines()
    assert lines[-1] == f"trainer: error: {run}: {problem}", err
    assert "Traceback" not in err and sum("error" in line for line in lines) == 1, err
    assert _snapshot(run) == before  # nothing deleted, added or rewritten


def _resume_completes(run: Path, args: list[str]) -> None:
    assert trainer_main([*args, "--resume"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["completed"] == 2 and [v["task"] for v in info["versions"]] == [
        None,
        "colors",
        "moods",
    ]


def test_resume_refuses_a_changed_config(stopped_run, capsys) -> None:
    run = stopped_run["run"]
    args = ["--config", str(stopped_run["cfg"]), "--out", str(run)]
    problem = "--resume needs the same config as the run"
    _resume_is_refused(run, [*args, "--set", "train.lr=5e-4"], capsys, problem)
    # The same value written differently is the same config: not refused (below); a
    # changed config file is refused like a changed --set.
    original = stopped_run["cfg"].read_text()
    stopped_run["cfg"].write_text(original.replace("batch_size: 4", "batch_size: 2"))
    _resume_is_refused(run, args, capsys, problem)
    stopped_run["cfg"].write_text(original)
    _resume_completes(run, [*args, "--set", "train.lr=0.001"])  # 1e-3, the default


def test_resume_refuses_a_changed_base_model(stopped_run, capsys) -> None:
    run, model = stopped_run["run"], stopped_run["model"]
    args = ["--config", str(stopped_run["cfg"]), "--out", str(run)]
    # Another random tiny Llama at the same path: same config, same tokenizer, other weights.
    original = model.parent / "original-model"
    model.rename(original)
    build_tiny_llama(model, TinyLlamaSpec(seed=1))
    assert fingerprint(load_tensors(model)) != fingerprint(load_tensors(original))
    _resume_is_refused(run, args, capsys, "the base model changed since the run started")
    shutil.rmtree(model)
    original.rename(model)
    _resume_completes(run, args)
