"""bench/interference.py: its statistics on hand-made updates, and the script on the tiny
model (training a stream, measuring another benchmark's runs, what it refuses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cl_quality import run_variant
from bench.interference import _top_mask, loss_summary, output_change, update_stats
from tests.helpers.bench import REPO, run_bench_module


def test_interference_stats_see_overlap_and_undoing() -> None:
    """An update on the earlier task's coordinates in the opposite direction reads as full
    overlap and cosine -1; one on fresh coordinates as no overlap and cosine 0."""
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    base = {q: torch.zeros(4, 4), v: torch.zeros(2, 4)}
    first = {q: base[q].clone(), v: base[v].clone()}
    first[q][0, :2] = torch.tensor([0.5, -0.5])
    undo = {q: first[q] / 2, v: base[v].clone()}  # half-way back on those two
    fresh = {q: undo[q].clone(), v: undo[v].clone()}
    fresh[v][1, 3] = 2.0
    full_rank = {q: fresh[q] + torch.eye(4), v: fresh[v].clone()}
    stats = update_stats([base, first, undo, fresh, full_rank], [q, v], rank=1)

    assert stats[0]["density"] == 2 / 24 and "cos_with_earlier" not in stats[0]
    assert stats[0]["blocks"]["layer 0"]["density"] == 2 / 16
    assert stats[0]["blocks"]["layer 1"]["density"] == 0
    assert stats[1]["support_on_earlier"] == 1.0 and stats[1]["energy_on_earlier"] == 1.0
    assert stats[1]["cos_with_earlier"] == pytest.approx(-1.0)
    assert stats[1]["support_on_earlier_chance"] == 2 / 16  # per matrix: all of it in q
    assert stats[2]["support_on_earlier"] == 0.0 and stats[2]["cos_with_earlier"] == 0.0
    assert stats[2]["mean_abs_on_support"] == 2.0 and stats[2]["norm"] == 2.0
    assert [s["low_rank_energy"] for s in stats[:3]] == pytest.approx([1.0, 1.0, 1.0])
    assert stats[3]["low_rank_energy"] == pytest.approx(0.25)  # the identity, rank 1 of 4
    assert stats[3]["blocks"]["layer 1"]["low_rank_energy"] == 1.0  # unchanged: nothing
    assert stats[0]["column_concentration"] == 0.5  # one of its two columns (2 % of 4 -> 1)
    assert "heavy_columns_on_earlier" not in stats[2]  # it changed no matrix an earlier did

    again = {q: first[q].clone(), v: base[v].clone()}
    again[q][:, 3] = 1.0  # a column the first task did not touch
    same = {q: again[q].clone(), v: base[v].clone()}
    same[q][:, 3] = 3.0  # the same heavy column again
    stats = update_stats([base, again, same], [q, v], rank=1)
    assert stats[1]["heavy_columns_on_earlier"] == 1.0 and stats[1]["column_concentration"] == 1.0


def test_interference_top_masks_never_count_zero_entries_as_overlap() -> None:
    """A sparse block has fewer non-zero entries than the top share asks for: the masks
    hold only the non-zero ones, so two updates on different coordinates never overlap."""
    a, b = torch.zeros(1000), torch.zeros(1000)
    a[3], b[7] = 1.0, 2.0
    assert (
        int(_top_mask(a, 0.05).sum()) == 1 and not (_top_mask(a, 0.05) & _top_mask(b, 0.05)).any()
    )
    assert not _top_mask(torch.zeros(10), 0.5).any()


def test_interference_output_change_is_relative_and_sees_input_directions() -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    before = {name: torch.eye(3)}
    x = torch.randn(5, 3)
    assert output_change(before, {name: 0.1 * torch.eye(3).reshape(-1)}, {name: x}) == (
        pytest.approx(0.01)
    )
    first_column = torch.zeros(3, 3)
    first_column[:, 0] = 1.0  # acts on input direction 0 only
    along_others = torch.tensor([[0.0, 1.0, 2.0], [0.0, -1.0, 0.5]])
    assert output_change(before, {name: first_column.reshape(-1)}, {name: along_others}) == 0.0


def test_interference_loss_summary_reads_forgetting_and_rise_per_merge() -> None:
    matrix = [
        [3.0, 3.0, 3.0],  # base
        [1.0, 2.5, 2.9],  # after task 0
        [1.5, 0.5, 2.8],  # after task 1: task 0 rose 0.5
        [2.0, 0.7, 0.4],  # after task 2: task 0 rose 0.5 more, task 1 0.2
    ]
    out = loss_summary(matrix)
    assert out["forgetting"] == pytest.approx([1.0, 0.2])
    assert out["mean_forgetting"] == pytest.approx(0.6)
    assert out["rise_per_merge"] == [pytest.approx([0.5]), pytest.approx([0.5, 0.2])]
    with pytest.raises(ValueError, match="4 versions needs 3 tasks"):
        loss_summary([row[:2] for row in matrix])


def test_interference_runs_a_stream_and_measures_every_version(
    tiny_model_dir: Path, cl_data_root: Path, tmp_path: Path
) -> None:
    args = ["bench.interference", "--model", str(tiny_model_dir), "--data", str(cl_data_root)]
    args += ["--tasks", "bbc_topic", "movie_sentiment", "tweet_sentiment", "--train-rows", "16"]
    args += ["--loss-rows", "8", "--input-rows", "2", "--max-length", "96", "--batch-size", "4"]
    args += ["--tag", "t"]
    args += ["--runs", str(tmp_path / "runs"), "--variants", "incLoRA", "incLoRA+jump"]
    run_bench_module([*args, "--merge-scales", "0.5"], tmp_path)  # measured with the rest
    result = json.loads((tmp_path / "interference_t.json").read_text())
    dense, gated = result["rows"]
    for row in (dense, gated):
        assert [m["scales"] for m in row["merge_scales"]["merges"]] == [[0.5, 1.0]] * 2
        assert len(row["loss"]["matrix"]) == 4 and len(row["updates"]) == 3  # base + 3 versions
        assert len(row["loss"]["rise_per_merge"]) == 2
        assert set(row["loss"]["forgetting"]) == {"bbc_topic", "movie_sentiment"}
        assert all(u["output_change_own"] > 0 for u in row["updates"])
        assert "output_change_earlier" not in row["updates"][0]
        assert all(u["output_change_earlier"] > 0 for u in row["updates"][1:])
    assert gated["updates"][0]["density"] < dense["updates"][0]["density"]
    # --device auto: the forward passes ran on the GPU where there is one
    assert {dense["device"], gated["device"]} == {"cuda" if torch.cuda.is_available() else "cpu"}
    # the base row is the same model for both
    assert gated["loss"]["matrix"][0] == dense["loss"]["matrix"][0]
    assert "| incLoRA+jump |" in (tmp_path / "interference_t.md").read_text()
    # --remeasure: the updates again from the kept runs, the loss as it was
    (tmp_path / "interference" / "t" / "incLoRA.json").write_text(
        json.dumps({**dense, "updates": []})
    )
    run_bench_module([*args, "--remeasure"], tmp_path)
    again = json.loads((tmp_path / "interference_t.json").read_text())["rows"][0]
    assert again["updates"] == dense["updates"] and again["loss"] == dense["loss"]
    # another budget under the same tag is refused, nothing retrained
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(tmp_path)}
    refused = subprocess.run(
        [sys.executable, "-m", *args, "--loss-rows", "4"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "loss_rows: 8 -> 4" in refused.stdout


def test_interference_trains_no_matched_density_variant(tmp_path: Path) -> None:
    """Top-k at the learned gate's density needs that density from another benchmark's
    run: interference measures such a run (--measure-only) and refuses to train one."""
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(tmp_path)}
    refused = subprocess.run(
        [sys.executable, "-m", "bench.interference", "--variants", "incLoRA+topk@jump"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "incLoRA+topk@jump: trained at a density another" in refused.stderr
    assert not (tmp_path / "interference").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_interference_refuses_cuda_on_a_machine_without_it(tmp_path: Path) -> None:
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(tmp_path)}
    refused = subprocess.run(
        [sys.executable, "-m", "bench.interference", "--measure-only", "--device", "cuda"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--device cuda: this machine has no CUDA device" in refused.stderr
    assert not (tmp_path / "interference").exists()  # refused before anything was written


def test_interference_measures_another_benchmarks_finished_runs_from_their_deltas(
    tiny_model_dir: Path, cl_data_root: Path, tmp_path: Path
) -> None:
    """--measure-only trains nothing: it measures a cl_quality-style run that kept only its
    last merged checkpoint, every version rebuilt from the base and the run's deltas."""
    data = {"root": str(cl_data_root), "train_rows": 8, "eval_rows": 4, "max_length": 96}
    data["tasks"] = ["bbc_topic", "movie_sentiment", "tweet_sentiment"]
    cfg = {"model": str(tiny_model_dir), "data": data, "adapter": {"r": 4}}
    cfg["train"] = {"batch_size": 4, "eval_batch_size": 8}
    runs = tmp_path / "runs"
    run_variant("incLoRA+jump", cfg, [], runs / "t" / "incLoRA_jump", "in_process", {})
    info = json.loads((runs / "t" / "incLoRA_jump" / "run.json").read_text())
    assert [v["merged"] for v in info["versions"][1:3]] == [None, None]  # only the last kept
    before = sorted(p.name for p in (runs / "t").iterdir())
    args = ["bench.interference", "--measure-only", "--runs", str(runs), "--tag", "t"]
    args += ["--loss-rows", "4", "--input-rows", "2", "--variants", "incLoRA+jump", "incLoRA"]
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(tmp_path)}
    measured = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=True,
    )  # fmt: skip
    assert "== incLoRA: no finished run at" in measured.stdout  # never trained here
    assert sorted(p.name for p in (runs / "t").iterdir()) == before  # nothing trained
    (row,) = json.loads((tmp_path / "interference_t.json").read_text())["rows"]
    assert row["variant"] == "incLoRA+jump" and row["config"]["adapter"]["r"] == 4
    assert len(row["loss"]["matrix"]) == 4 and len(row["updates"]) == 3
    densities = [t["delta_density"] for t in json.loads(
        (runs / "t" / "incLoRA_jump" / "metrics.json").read_text()
    )["tasks"]]  # fmt: skip
    # each rebuilt version differs from the previous one exactly by the task's delta
    # (the trainer's density is over adapted entries, the same coordinates)
    assert [u["density"] for u in row["updates"]] == pytest.approx(densities)
    # --merge-scales on the kept row (given in any order, repeated): each later merge at 0,
    # 0.5 and 1 of its update, nothing else measured again. At 0 the earlier tasks sit on
    # the previous version, at 1 the merge is the run's own: the loss matrix's entries.
    scaled = subprocess.run(
        [sys.executable, "-m", *args, "--merge-scales", "1", "0.5", "0", "0.5"], cwd=REPO,
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "== incLoRA+jump: merge scales [0.0, 0.5, 1.0]" in scaled.stdout
    (again,) = json.loads((tmp_path / "interference_t.json").read_text())["rows"]
    assert again["updates"] == row["updates"] and again["loss"] == row["loss"]
    assert again["merge_scales"]["device"] == row["device"]
    merges = again["merge_scales"]["merges"]
    assert [m["task"] for m in merges] == ["movie_sentiment", "tweet_sentiment"]
    matrix, rises = row["loss"]["matrix"], row["loss"]["rise_per_merge"]
    for v, m in enumerate(merges, start=2):
        assert m["scales"] == [0.0, 0.5, 1.0]
        assert m["earlier_rise"][0] == pytest.approx(0.0, abs=1e-6)
        assert m["own_loss"][2] == pytest.approx(matrix[v][v - 1], abs=1e-5)
        assert m["earlier_rise"][2] == pytest.approx(sum(rises[v - 2]) / (v - 1), abs=1e-5)
        assert m["own_loss"][1] != pytest.approx(m["own_loss"][2], abs=1e-4)
    page = (tmp_path / "interference_t.md").read_text()
    assert "| incLoRA+jump | tweet_sentiment | 0.5 |" in page
    # asked again at the same scales: kept as it is, its summary too (no new date)
    summary = (tmp_path / "interference_t.json").read_bytes()
    kept = subprocess.run(
        [sys.executable, "-m", *args, "--merge-scales", "0", "0.5", "1"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "== incLoRA+jump: kept" in kept.stdout and "merge scales" not in kept.stdout
    assert (tmp_path / "interference_t.json").read_bytes() == summary
    refused = subprocess.run(
        [sys.executable, "-m", *args, "--merge-scales", "-1"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "--merge-scales: fractions of the update" in refused.stderr
    # other scales once the run is gone (a later checkout): the row is kept as it is
    (runs / "t" / "incLoRA_jump").rename(runs / "t" / "aside")
    gone = subprocess.run(
        [sys.executable, "-m", *args, "--merge-scales", "0.25"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "== incLoRA+jump: kept" in gone.stdout and "its run is gone" in gone.stdout
    (runs / "t" / "aside").rename(runs / "t" / "incLoRA_jump")
    assert json.loads((tmp_path / "interference_t.json").read_text())["rows"] == [again]
    # nor on another device than its loss matrix's (a row measured on a GPU, here a CPU)
    row_path = tmp_path / "interference" / "t" / "incLoRA+jump.json"
    row_path.write_text(json.dumps({**again, "device": "cuda"}))
    other = subprocess.run(
        [sys.executable, "-m", *args, "--merge-scales", "0.25", "--device", "cpu"], cwd=REPO,
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "its loss was measured on cuda: --device cuda" in other.stdout
    assert json.loads(row_path.read_text())["merge_scales"] == again["merge_scales"]
    # a broken chain is refused, with the version named
    delta = runs / "t" / "incLoRA_jump" / "deltas" / info["versions"][2]["delta"]
    delta.write_bytes(delta.read_bytes()[:-8])
    (tmp_path / "interference" / "t" / "incLoRA+jump.json").unlink()
    broken = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert broken.returncode != 0 and "version 2:" in broken.stderr
