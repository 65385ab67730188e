"""bench/cl_quality.py: saved rows and partial variants, the matched-density top-k, the
server folder, the variants' configs and the evaluating server's cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cl_quality import (
    VARIANTS,
    check_configs,
    eval_server,
    run_variant,
    server_folder,
    variant_adapter,
)
from bench.common import running
from tests.conftest import TWO_TASKS
from tests.helpers.bench import REPO
from trainer.config import default_data_root


def test_cl_quality_refuses_a_saved_row_run_with_other_settings(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A re-run with another setting must not mix its rows with the saved ones under one
    summary: the saved row's settings are compared first, and a difference is named."""
    rows = tmp_path / "cl_quality" / "mine"
    rows.mkdir(parents=True)
    saved = {"variant": "incLoRA", "OA": 0.5, "BWT": 0.0, "s_per_step": 1.0, "peak_rss_mib": 1}
    saved["settings"] = {"train": {"lr": 0.5}, "overrides": []}
    (rows / "incLoRA.json").write_text(json.dumps(saved))
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "bench.cl_quality", "--tag", "mine", "--variants", "incLoRA"]
    cmd += ["--model", str(tiny_model_dir), "--lr", "0.001"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "was run with other settings" in result.stderr
    assert "train.lr: 0.5 -> 0.001" in result.stderr and "--force" in result.stderr
    assert json.loads((rows / "incLoRA.json").read_text()) == saved  # left as it was
    # the data default is the checkout's data/cl_benchmark (never a folder beside it)
    assert f"data.root: None -> '{default_data_root().resolve()}'" in result.stderr
    # a link as --data records the folder it names
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cmd += ["--data", str(tmp_path / "link")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert f"data.root: None -> '{(tmp_path / 'real').resolve()}'" in result.stderr


def test_a_partial_variant_from_another_config_is_kept_aside_and_run_again(
    tiny_model_dir: Path, cl_data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A variant left half-done by older code whose config defaults changed since cannot
    be resumed (the trainer refuses); the benchmark moves it aside and starts it over
    instead of stopping the whole regime script."""

    def config(lr: float) -> dict:
        data = {"root": str(cl_data_root), "tasks": list(TWO_TASKS), "train_rows": 8}
        data |= {"eval_rows": 4, "max_length": 96}
        train = {"lr": lr, "batch_size": 4, "eval_batch_size": 8, "epochs": 1}
        return {"model": str(tiny_model_dir), "data": data, "adapter": {"r": 4}, "train": train}

    run_dir = tmp_path / "runs" / "incLoRA"
    run_variant("incLoRA", config(0.001), [], run_dir, "in_process", {"gate": "none"})
    capsys.readouterr()
    row = run_variant("incLoRA", config(0.002), [], run_dir, "in_process", {"gate": "none"})
    out = capsys.readouterr().out
    (stale,) = tmp_path.joinpath("runs").glob("incLoRA.stale-*")
    assert f"the config changed since the partial run; moved to {stale}" in out
    assert json.loads((stale / "run.json").read_text())["config"]["train"]["lr"] == 0.001
    assert json.loads((run_dir / "run.json").read_text())["config"]["train"]["lr"] == 0.002
    assert row["variant"] == "incLoRA" and 0 <= row["OA"] <= 1


def test_the_matched_density_top_k_keeps_its_twins_measured_density(
    tiny_model_dir: Path, cl_data_root: Path, tmp_path: Path
) -> None:
    """incLoRA+topk@jump reads the mean density incLoRA+jump measured in the same result
    set with the same settings, and refuses to start before that row exists."""
    data = {"root": str(cl_data_root), "tasks": list(TWO_TASKS), "train_rows": 8}
    data |= {"eval_rows": 4, "max_length": 96}
    cfg = {"model": str(tiny_model_dir), "data": data, "adapter": {"r": 4}}
    cfg["train"] = {"batch_size": 4, "eval_batch_size": 8}
    rows = tmp_path / "rows"
    rows.mkdir()
    settings = {"train": {"lr": 0.001}, "overrides": []}
    name = "incLoRA+topk@jump"
    with pytest.raises(SystemExit, match="keeps incLoRA\\+jump's measured density: run"):
        variant_adapter(name, rows, settings)
    twin = {"mean_density": 0.05, "settings": {"train": {"lr": 0.002}, "overrides": []}}
    (rows / "incLoRA+jump.json").write_text(json.dumps(twin))
    with pytest.raises(
        SystemExit, match=re.escape("run with other settings (train.lr: 0.002 -> 0.001)")
    ):
        variant_adapter(name, rows, settings)
    (rows / "incLoRA+jump.json").write_text(json.dumps({**twin, "settings": settings}))
    adapter = variant_adapter(name, rows, settings)
    assert adapter == {"gate": "topk", "topk_density": 0.05}
    run_dir = tmp_path / "runs" / "matched"
    row = run_variant(name, cfg, [], run_dir, "in_process", adapter)
    adapter = json.loads((run_dir / "run.json").read_text())["config"]["adapter"]
    assert (adapter["gate"], adapter["topk_density"]) == ("topk", 0.05)
    # every task's update keeps 5 % of each adapted matrix group's entries (ties aside)
    assert row["task_density"]["max"] == pytest.approx(0.05, abs=0.002)


def test_a_matched_row_records_its_density_and_is_refused_once_its_twin_changed(
    tiny_model_dir: Path, cl_data_root: Path, tmp_path: Path
) -> None:
    """Through the CLI: the twin runs first whatever the order asked, the matched row keeps
    the density it ran at, and a twin re-run since (another density) makes it stale. The
    two variants share the base row through the benchmark's eval cache, which --force
    empties."""
    cmd = [sys.executable, "-m", "bench.cl_quality", "--tag", "m", "--model", str(tiny_model_dir)]
    cmd += ["--data", str(cl_data_root), "--order", "demo", "--train-rows", "8"]
    cmd += ["--eval-rows", "4", "--max-length", "96", "--batch-size", "4"]
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(tmp_path)}
    env["JLSERVE_BENCH_RUNS"] = str(tmp_path / "runs")
    run = {"cwd": REPO, "env": env, "capture_output": True, "text": True, "timeout": 600}
    done = subprocess.run([*cmd, "--variants", "incLoRA+topk@jump", "incLoRA+jump"], **run)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = tmp_path / "cl_quality" / "m"
    twin = json.loads((rows / "incLoRA+jump.json").read_text())
    matched = json.loads((rows / "incLoRA+topk@jump.json").read_text())
    assert matched["topk_density"] == twin["mean_density"]
    # a variant run start to end records its whole time, which covers its parts
    assert twin["wall_s"] > twin["train_s"] + twin["eval_s"] > 0

    def evaluated(row: dict) -> int:  # the entries after each task
        return sum(v is not None for line in row["accuracy_matrix"] for v in line)

    cache = tmp_path / "runs" / "cl_quality" / "eval-cache"  # shared by every result set
    n_tasks = len(twin["base_row"])
    assert matched["base_row"] == twin["base_row"]
    assert len(list(cache.glob("*.json"))) == n_tasks + evaluated(twin) + evaluated(matched)
    forced = subprocess.run([*cmd, "--variants", "incLoRA+jump", "--force"], **run)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert len(list(cache.glob("*.json"))) == n_tasks + evaluated(twin)  # emptied first
    (rows / "incLoRA+jump.json").write_text(json.dumps({**twin, "mean_density": 0.5}))
    stale = subprocess.run([*cmd, "--variants", "incLoRA+topk@jump"], **run)
    assert stale.returncode == 2
    assert f"kept density {matched['topk_density']}, its twin now measures 0.5" in stale.stderr


def test_a_variant_that_starts_over_gets_an_empty_server_folder_and_a_resumed_one_keeps_it(
    tmp_path: Path,
) -> None:
    """A variant's server replays the versions in its state: a run that starts (after
    --force, or its folder removed by hand) must find the base model served, so its
    server folder is emptied; a resumed run's server comes back at its last version."""
    run_dir = tmp_path / "incLoRA"
    old = tmp_path / "incLoRA-server" / "state" / "versions.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    assert server_folder(run_dir) == old.parents[1] and old.is_file()  # resumed: kept
    shutil.rmtree(run_dir)  # what --force does, or a user
    assert server_folder(run_dir).is_dir() and not old.exists()  # starts: emptied


def test_every_variant_is_a_valid_config_and_a_refused_override_stops_before_training() -> None:
    base = {"model": "m", "data": {"order": "short_order_1"}, "adapter": {"r": 8}, "train": {}}
    check_configs(list(VARIANTS), base, [])
    check_configs(["incLoRA", "incLoRA+jump"], base, ["adapter.l0_weight=5"])
    with pytest.raises(SystemExit, match=r"incLoRA\+jump-ref: .*reference sets l0_weight"):
        check_configs(list(VARIANTS), base, ["adapter.l0_weight=5"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM binds CPU threads only on the CPU")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="vLLM's default binds 1 CPU too")
def test_the_evaluating_server_computes_on_every_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The trainer waits while its evaluating server generates, so the server's CPU worker
    takes every CPU this process may use (vLLM's default keeps one for its scheduler): the
    pinned vLLM must bind as asked, as its log says."""
    cpus = sorted(os.sched_getaffinity(0))
    with running(eval_server(tiny_model_dir, tmp_path)):
        log = (tmp_path / "server.log").read_text()
    assert f"core ids={cpus}" in log
