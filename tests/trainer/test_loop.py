"""End to end on the tiny model: outputs, exact deltas, resume, CLI errors."""

import json
from pathlib import Path

import pytest

from jlserve.checkpoint import TensorDigests, fingerprint, load_tensors
from jlserve.cli import main as jlserve_main
from jlserve.delta import plan_update, read_delta
from tests.conftest import CL_BENCHMARK_DIR
from trainer.cli import main as trainer_main
from trainer.config import load_config


def _config(tmp_path: Path, model: Path, **method) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model: {model}\n"
        f"data: {{root: {CL_BENCHMARK_DIR}, tasks: [cb, copa], train_rows: 16, eval_rows: 8,"
        " max_length: 96}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
        f"method: {json.dumps({'name': 'incLoRA', **method})}\n"
    )
    return path


def test_two_task_stream_writes_every_output_and_exact_deltas(tmp_path, tiny_model_dir) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    assert (
        jlserve_main(["train", "--config", str(cfg), "--out", str(run), "--keep-all-merged"]) == 0
    )
    for name in (
        "run.json",
        "metrics.json",
        "report.md",
        "config.yaml",
        "accuracy.png",
        "density.png",
        "overlap.png",
    ):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["completed"] == 2 and [v["version"] for v in info["versions"]] == [0, 1, 2]
    assert (run / "config.yaml").read_text().startswith("# jlserve train --config")
    assert sorted(p.name for p in (run / "deltas").iterdir()) == [
        "task001-cb.safetensors",
        "task002-copa.safetensors",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    acc = metrics["accuracy"]
    assert acc["matrix"][0][1] is None and acc["matrix"][1][1] is not None
    assert {"OA", "BWT"} <= acc.keys()
    assert 0 < metrics["density"]["cb"]["density"] < 1
    assert len(metrics["support_overlap"]["jaccard"]) == 2
    # Applying the deltas to the base reproduces every merged checkpoint bit for bit.
    tensors = load_tensors(tiny_model_dir)
    digests = TensorDigests(tensors)
    for v in info["versions"][1:]:
        update = plan_update(tensors, digests, read_delta(run / "deltas" / v["delta"]))
        tensors = {**tensors, **update.changed}
        digests = update.digests
        merged = load_tensors(run / "merged" / v["merged"])
        assert fingerprint(tensors) == fingerprint(merged) == v["fingerprint"]
        assert all(tensors[n].equal(merged[n]) for n in merged)


@pytest.mark.parametrize("method", ["ella", "seqLoRA"])
def test_resume_gives_the_same_results_as_an_uninterrupted_run(
    tmp_path, tiny_model_dir, method
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, name=method)
    full, part = tmp_path / "full", tmp_path / "part"
    assert trainer_main(["--config", str(cfg), "--out", str(full)]) == 0
    assert trainer_main(["--config", str(cfg), "--out", str(part), "--stop-after", "1"]) == 0
    assert json.loads((part / "run.json").read_text())["completed"] == 1
    assert trainer_main(["--config", str(cfg), "--out", str(part), "--resume"]) == 0
    a, b = (json.loads((d / "run.json").read_text()) for d in (full, part))
    assert [v["fingerprint"] for v in a["versions"]] == [v["fingerprint"] for v in b["versions"]]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert ma["accuracy"] == mb["accuracy"] and ma["density"] == mb["density"]
    # Only the last merged checkpoint is kept without --keep-all-merged.
    assert [p.name for p in (part / "merged").iterdir()] == ["v002-copa"]


def test_cli_user_errors_exit_2_with_one_line(tmp_path, tiny_model_dir, capsys) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert jlserve_main(["train", "--config", str(cfg), "--out", str(tmp_path / "busy")]) == 2
    assert (
        trainer_main(["--config", str(cfg), "--out", str(tmp_path / "new"), "--set", "train.lr=0"])
        == 2
    )
    assert trainer_main(["--config", str(cfg), "--out", str(tmp_path / "x"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("error:" in line for line in err)
    assert "Traceback" not in "".join(err)
    assert load_config(cfg).data.tasks == ["cb", "copa"]
