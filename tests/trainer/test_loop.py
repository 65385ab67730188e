"""End to end on the tiny model: outputs, exact deltas, resume, CLI errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jlserve.checkpoint import TensorDigests, fingerprint, load_tensors
from jlserve.cli import main as jlserve_main
from jlserve.delta import plan_update, read_delta
from tests.conftest import REPO_ROOT
from trainer.cli import main as trainer_main
from trainer.config import load_config
from trainer.loop import Recipe, train


def _config(tmp_path: Path, model: Path, data: Path, **method) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model: {model}\n"
        f"data: {{root: {data}, tasks: [movie_sentiment, tweet_sentiment], train_rows: 16,"
        " eval_rows: 8,"
        " max_length: 96}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
        f"method: {json.dumps({'name': 'incLoRA', **method})}\n"
    )
    return path


def test_two_task_stream_writes_every_output_and_exact_deltas(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root)
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
        "task001-movie_sentiment.safetensors",
        "task002-tweet_sentiment.safetensors",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    acc = metrics["accuracy"]
    # The base row covers every task; after task 1 the next task is evaluated too (FWT).
    assert all(b is not None for b in acc["base"])
    assert acc["matrix"][0][1] is not None and acc["matrix"][1][1] is not None
    assert {"OA", "BWT", "FWT", "base_OA", "gain_over_base"} <= acc.keys()
    assert 0 < metrics["density"]["movie_sentiment"]["density"] < 1
    assert all(t["eval_seconds"] > 0 and t["train_seconds"] > 0 for t in metrics["tasks"])
    # host memory always; GPU memory where the run had a GPU (device auto)
    on_gpu = torch.cuda.is_available()
    assert all(t["peak_rss_mib"] > 0 and ("peak_gpu_mib" in t) == on_gpu for t in metrics["tasks"])
    _assert_tensorboard_events(run / "tensorboard", info)
    # The CPU trains in groups of like length (trainer.step.grouped_loss), a GPU padded.
    path = "one padded batch" if on_gpu else "length groups"
    assert all(t["task_loss"] == path for t in info["task_log"])
    # The held-out loss of every task, where the metric was evaluated, and its rise.
    loss = metrics["loss"]
    filled = [[v is not None for v in row] for row in loss["matrix"]]
    assert filled == [[v is not None for v in row] for row in acc["matrix"]]
    assert all(v > 0 for v in loss["base"]) and set(loss["forgetting"]) == {"movie_sentiment"}
    assert metrics["task_metrics"] == {"movie_sentiment": "exact", "tweet_sentiment": "exact"}
    assert "## Held-out loss" in (run / "report.md").read_text()
    assert len(metrics["support_overlap"]["jaccard"]) == 2
    # Applying the deltas (format v2, the default) to the base reproduces every merged
    # checkpoint bit for bit.
    tensors = load_tensors(tiny_model_dir)
    digests = TensorDigests(tensors)
    for v in info["versions"][1:]:
        delta = read_delta(run / "deltas" / v["delta"])
        assert delta.metadata.format_version == 2
        update = plan_update(tensors, digests, delta)
        tensors = {**tensors, **update.changed}
        digests = update.digests
        merged = load_tensors(run / "merged" / v["merged"])
        assert fingerprint(tensors) == fingerprint(merged) == v["fingerprint"]
        assert all(tensors[n].equal(merged[n]) for n in merged)


def _same_results(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert [v["fingerprint"] for v in ra["versions"]] == [v["fingerprint"] for v in rb["versions"]]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["accuracy"] == mb["accuracy"] and ma["density"] == mb["density"]


def _assert_tensorboard_events(events: Path, info: dict) -> None:
    """The promised tags, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    promised = {"train/loss", "train/lr", "train/grad_norm", "train/density", "train/theta/global"}
    promised |= {"stream/OA", "stream/delta_density", "train/l0"}
    promised |= {f"task/{name}/accuracy" for name in info["tasks"]}
    assert promised <= scalars, promised - scalars
    steps = [e.step for e in acc.Scalars("train/loss")]
    total = sum(t["steps"] for t in info["task_log"])
    assert steps == sorted(steps) and steps[-1] == total  # steps done, counted over the run
    assert [e.step for e in acc.Scalars("stream/delta_density")] == [0, 1]
    assert "accuracy_matrix/text_summary" in acc.Tags()["tensors"]


def test_resume_after_stop_gives_the_same_results(tmp_path, tiny_model_dir, cl_data_root) -> None:
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, name="seqLoRA")
    full, part = tmp_path / "full", tmp_path / "part"
    assert trainer_main(["--config", str(cfg), "--out", str(full)]) == 0
    assert trainer_main(["--config", str(cfg), "--out", str(part), "--stop-after", "1"]) == 0
    info = json.loads((part / "run.json").read_text())
    assert info["completed"] == 1
    # Saved before a setting existed whose default keeps the old behaviour: still resumes.
    del info["config"]["adapter"]["threshold_training"]
    (part / "run.json").write_text(json.dumps(info))
    assert trainer_main(["--config", str(cfg), "--out", str(part), "--resume"]) == 0
    _same_results(full, part)
    # Only the last merged checkpoint and method state are kept without --keep-all-merged.
    assert [p.name for p in (part / "merged").iterdir()] == ["v002-tweet_sentiment"]
    assert [p.name for p in (part / "state").iterdir()] == ["method-v002.safetensors"]


def test_the_needed_eval_schedule_gives_the_full_matrix_metrics(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    """train.eval_schedule=needed skips the entries no metric reads and gives the same OA,
    BWT and FWT as the full matrix (same weights: evaluation does not change training)."""
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root)
    stream = ["--set", "data.tasks=[movie_sentiment, tweet_sentiment, bbc_topic]"]
    stream += ["--set", "data.train_rows=8"]
    results = {}
    for schedule in ("full", "needed"):
        out = tmp_path / schedule
        args = ["--config", str(cfg), "--out", str(out), *stream]
        assert trainer_main([*args, "--set", f"train.eval_schedule={schedule}"]) == 0
        results[schedule] = json.loads((out / "metrics.json").read_text())["accuracy"]
    full, needed = results["full"], results["needed"]
    for key in ("OA", "BWT", "FWT", "base_OA", "OA_after"):
        assert needed[key] == full[key], key
    assert full["matrix"][1][0] is not None and needed["matrix"][1][0] is None
    filled = sum(v is not None for row in needed["matrix"] for v in row) + len(needed["base"])
    assert filled == 4 * 3 - 2  # base row, diagonal, next task, last row


def test_sparse_schedule_at_the_end_trains_dense_and_cuts_once_before_the_merge(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    """adapter.sparse_schedule=[1, 1] (the no-re-fitting ablation): the gate never switches
    on in training, and the threshold is set once before the merge from the order
    statistic, keeping as many entries as the adapter has parameters."""
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root)
    out = tmp_path / "run"
    args = ["--config", str(cfg), "--out", str(out), "--set", "adapter.sparse_schedule=[1, 1]"]
    assert trainer_main(args) == 0
    weights = [
        t
        for n, t in load_tensors(tiny_model_dir).items()
        if n.endswith(("q_proj.weight", "v_proj.weight"))
    ]
    budget = sum(8 * (w.shape[0] + w.shape[1]) for w in weights)  # r (d_in + d_out), r = 8
    entries = sum(w.numel() for w in weights)
    for log in json.loads((out / "run.json").read_text())["task_log"]:
        assert log["t1"] == log["steps"] == log["t2"]  # never reached in training
        assert log["log_threshold_at_reinit"] is None
        assert 0.99 * budget / entries <= log["gate_density"] <= budget / entries


@pytest.mark.parametrize("gate", ["jump", "none"])
def test_inflora_two_tasks_with_and_without_gate_and_exact_resume(
    tmp_path, tiny_model_dir, cl_data_root, gate
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, name="inflora")
    gate_arg = ["--set", f"adapter.gate={gate}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert trainer_main(["--config", str(cfg), "--out", str(full), *gate_arg]) == 0
    args = ["--config", str(cfg), "--out", str(part), *gate_arg]
    assert trainer_main([*args, "--stop-after", "1"]) == 0
    first = load_file(part / "state" / "method-v001.safetensors")
    assert trainer_main([*args, "--resume"]) == 0
    _same_results(full, part)
    last = load_file(part / "state" / "method-v002.safetensors")
    # The subspace memory: one orthonormal basis per adapted layer, grown by task 2.
    assert sorted(first) == sorted(last) and all(k.endswith(".input_basis") for k in last)
    for key, basis in last.items():
        assert 1 <= first[key].shape[1] <= basis.shape[1] <= basis.shape[0]
        assert basis[:, : first[key].shape[1]].equal(first[key])
    density = json.loads((full / "metrics.json").read_text())["density"]["tweet_sentiment"][
        "density"
    ]
    assert (density < 0.5) == (gate == "jump")


class _Crash(Exception):
    pass


def test_resume_after_a_crash_at_the_commit_point(
    tmp_path, tiny_model_dir, cl_data_root, monkeypatch
) -> None:
    """Killed after task 2 wrote its delta, checkpoint and ELLA state but before run.json
    named them: the resume must redo task 2 from task 1's files, exactly."""
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root, name="ella")
    full, part = tmp_path / "full", tmp_path / "part"
    assert trainer_main(["--config", str(cfg), "--out", str(full)]) == 0
    write_run_json = Recipe._write_run_json

    def crash_at_second_commit(self: Recipe) -> None:
        if self.completed == 2:
            raise _Crash
        write_run_json(self)

    with monkeypatch.context() as patch:
        patch.setattr(Recipe, "_write_run_json", crash_at_second_commit)
        with pytest.raises(_Crash):
            train(load_config(cfg), part)
    assert (part / "merged" / "v002-tweet_sentiment").is_dir()  # task 2's files were all written
    assert trainer_main(["--config", str(cfg), "--out", str(part), "--resume"]) == 0
    _same_results(full, part)


BAD_INPUTS = {
    "malformed yaml": ("config", "model: [\n", [], "not valid YAML"),
    "missing config": ("nothing", "", [], "cannot read config"),
    "unknown --set key": ("config", None, ["train.nope=1"], "train.nope"),
    "bad --set value": ("config", None, ["train.lr=["], "not valid YAML"),
    "bad --set syntax": ("config", None, ["train.lr"], "key=value"),
    "empty task list": ("config", None, ["data.tasks=[]"], "data.tasks"),
    "unknown task": ("config", None, ["data.tasks=[movie_sentiment, nope]"], "'nope' is not in"),
    "unknown order": ("config", None, ["data.tasks=null", "data.order=nope"], "unknown order"),
    "missing data root": (
        "config",
        None,
        ["data.root=/nonexistent"],
        "no tasks.json there; get the benchmark with `jlserve data cl-benchmark --source",
    ),
    "missing data file": (
        "data",
        None,
        ["data.tasks=[bbc_topic]"],
        "bbc_topic/train.json: cannot read",
    ),
    "empty data file": ("data", "[]", ["data.tasks=[bbc_topic]"], "bbc_topic/train.json: no rows"),
    "tasks.json not a mapping": ("data", "[]", ["data.tasks=[other]"], "expected {"),
    "ella lambda per task": (
        "config",
        None,
        ["method.name=ella", "method.ella_lambda=[1.0]"],
        "the stream has 2 tasks",
    ),
    "max_length too short": ("config", None, ["data.max_length=8"], "too short"),
    "missing model": ("config", None, ["model=/nonexistent"], "model:"),
    "bad device": ("config", None, ["train.device=nonsense"], "train.device"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(
    tmp_path, tiny_model_dir, cl_data_root, capsys, case
) -> None:
    kind, text, overrides, message = BAD_INPUTS[case]
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root)
    if kind == "config" and text is not None:
        cfg.write_text(text)
    elif kind == "nothing":
        cfg = tmp_path / "missing.yaml"
    elif kind == "data":  # a copy of the benchmark index with one task's files changed
        root = tmp_path / "data"
        (root / "bbc_topic").mkdir(parents=True)
        index = json.loads((cl_data_root / "tasks.json").read_text())
        if case == "tasks.json not a mapping":
            index = text
        (root / "tasks.json").write_text(json.dumps(index))
        if text is not None and case == "empty data file":
            (root / "bbc_topic" / "train.json").write_text(text)
        overrides = [*overrides, f"data.root={root}"]
    out = tmp_path / "out"
    args = ["--config", str(cfg), "--out", str(out)]
    for assignment in overrides:
        args += ["--set", assignment]
    assert trainer_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error:"), err
    assert message in err[0]
    assert not out.exists()  # nothing written for a run that never started


def test_run_directory_errors_exit_2_through_jlserve_train(
    tmp_path, tiny_model_dir, cl_data_root, capsys
):
    cfg = _config(tmp_path, tiny_model_dir, cl_data_root)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert jlserve_main(["train", "--config", str(cfg), "--out", str(tmp_path / "busy")]) == 2
    assert trainer_main(["--config", str(cfg), "--out", str(tmp_path / "x"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error:" in line for line in err)
    assert "not empty" in err[0] and "nothing to resume" in err[1]


def test_example_configs_parse_and_start_with_their_command() -> None:
    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith(("# jlserve train ", "# jlserve worker ")), path
        assert f" --config configs/{path.name} " in first, path
        assert "shared" not in path.read_text(), path  # a clone has no ../shared
        assert load_config(path).data.root == REPO_ROOT / "data" / "cl_benchmark"
