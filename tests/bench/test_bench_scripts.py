"""Smoke tests of the benchmark scripts on the tiny model: they run, write their JSON and
the report renders. No timing is asserted (the machine is shared); the server benchmarks
(hot_swap, serving) are covered through their helpers only, starting vLLM takes minutes.
"""

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

from bench.common import percentile, sparse_update, target_names, write_lora_adapter
from bench.hot_swap import build_chain, fused_bytes
from bench.scale import param_count, shape_for, write_chain, write_random_llama
from jlserve.checkpoint import TensorDigests, load_tensors, weight_files
from jlserve.delta import parse_delta, plan_update, read_delta
from trainer.config import default_data_root

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], results: Path) -> None:
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(results)}
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, check=True, timeout=300)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_sparse_update_changes_exactly_the_requested_fraction(tiny_model_dir: Path) -> None:
    base = load_tensors(tiny_model_dir)
    names = target_names(base, "qv")
    assert names and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in names)
    new = sparse_update(base, names, 0.05, seed=0)
    for n in names:
        changed = int((new[n].view(torch.int16) != base[n].view(torch.int16)).sum())
        assert changed == round(0.05 * base[n].numel())
        assert torch.isfinite(new[n]).all()


def test_hot_swap_chain_applies_in_order(tiny_model_dir: Path) -> None:
    base = load_tensors(tiny_model_dir)
    names = target_names(base, "qv")
    chain, final = build_chain(base, names, [0.01, 0.2], seed=0)
    state, digests = dict(base), TensorDigests(base)
    for item in chain:
        plan = plan_update(state, digests, parse_delta(item["bytes"]))
        state.update(plan.changed)
        digests = plan.digests
    assert all(torch.equal(state[n], final[n]) for n in names)
    assert fused_bytes(base, names) > sum(base[n].numel() * 2 for n in names)


def _random_llama(tokenizer_dir: Path, out: Path) -> tuple[Path, int]:
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    shape = shape_for(2e6, vocab)
    return write_random_llama(out, shape, tokenizer_dir, seed=0), param_count(shape)


def test_scale_checkpoint_is_sharded_and_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model, expected = _random_llama(tiny_model_dir, tmp_path / "model")
    assert len(weight_files(model)) >= 4 and (model / "tokenizer.json").is_file()
    assert sum(t.numel() for t in load_tensors(model).values()) == expected
    _, info = LlamaForCausalLM.from_pretrained(model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_scale_chain_applies_in_order_and_merges(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _ = _random_llama(tiny_model_dir, tmp_path / "model")
    base = load_tensors(model)
    names = target_names(base, "qv")
    out = tmp_path / "chain"
    manifest = write_chain(model, names, [0.01, 0.05], out, seed=0, merged=True)
    state, digests = dict(base), TensorDigests(base)
    for entry, density in zip(manifest["deltas"], [0.01, 0.05], strict=True):
        assert entry["nnz"] == sum(round(density * base[n].numel()) for n in names)
        plan = plan_update(state, digests, read_delta(out / entry["file"]))
        state.update(plan.changed)
        digests = plan.digests
    assert digests.fingerprint == TensorDigests(load_tensors(out / "merged")).fingerprint
    assert write_chain(model, names, [0.01, 0.05], out, seed=0) == manifest  # cached


def test_lora_adapter_loads_in_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapter = write_lora_adapter(tiny_model_dir, tmp_path / "lora", r=8, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = peft.PeftModel.from_pretrained(model, adapter)
    loaded = [n for n, _ in wrapped.named_parameters() if "lora_B" in n]
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert len(loaded) == 2 * cfg["num_hidden_layers"]


def test_scripts_run_and_report_renders(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = str(tiny_model_dir)
    _run(["bench.delta_size", "--quick", "--model", model], tmp_path)
    train = ["bench.train_step", "--quick", "--model", model, "--rounds", "1"]
    _run([*train, "--variants", "jumplora", "lora-trainer"], tmp_path)
    _run([*train, "--padding"], tmp_path)
    # bench/scale.py takes half an hour even quick: render its committed quick result.
    shutil.copy(REPO / "bench" / "results" / "scale_quick.json", tmp_path)
    _run(["bench.report", "--quick"], tmp_path)
    for name in ("delta_size_quick.json", "train_step_quick.json"):
        doc = json.loads((tmp_path / name).read_text())
        assert doc["machine"]["cpu_count"] and doc["created"]
    padding = json.loads((tmp_path / "train_step_padding_quick.json").read_text())
    assert [r["variant"] for r in padding["rows"]] == ["jumplora", "jumplora-grouped"]
    lengths = padding["settings"]["row_lengths"]
    assert len(lengths) == 8 and min(lengths) < max(lengths) == padding["settings"]["max_length"]
    page = (tmp_path / "benchmarks_quick.md").read_text()
    assert "## 4. Delta size" in page and "## 3. Training step" in page
    assert "### Rows of varied length: one padded batch vs groups of like length" in page
    assert (tmp_path / "img_quick" / "delta_size.png").is_file()
    assert "## 7. Serving at scale" in page and "| scale (0.2 B): start |" in page
    assert "## 8. GPU check" in page and "_Not run: " in page
    assert (tmp_path / "img_quick" / "scale.png").is_file()


def test_gpu_check_chain_stand_in_tasks_and_comparison(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """bench/gpu_check.py without a server: its delta chain replays onto the merged
    checkpoints, its stand-in tasks pass `jlserve data check`, and the answer comparison
    tells equal from different."""
    import argparse

    from bench.gpu_check import build_chain, compare, settings_for, write_synthetic_tasks
    from jlserve.checkpoint import fingerprint
    from jlserve.delta import read_delta
    from trainer.layout import check_root

    args = argparse.Namespace(
        device="cpu", quick=True, model=tiny_model_dir, data=None, out=tmp_path / "out"
    )
    built = build_chain(settings_for(args))
    chain = built["_chain"]
    state = load_tensors(tiny_model_dir)
    digests = TensorDigests(state)
    for i, path in enumerate(chain.deltas, start=1):
        plan = plan_update(state, digests, read_delta(path))
        state, digests = {**state, **plan.changed}, plan.digests
        assert (
            fingerprint(state)
            == chain.fingerprints[i]
            == fingerprint(load_tensors(chain.merged[i]))
        )
    assert [d["density"] for d in built["deltas"]] == [0.01, 0.02, 0.05]

    assert check_root(write_synthetic_tasks(tmp_path / "data", 8, 4)) == []

    a = [{"tokens": ["token_id:5"], "logprobs": [-0.5], "top": [{"token_id:5": -0.5}]}]
    b = [{"tokens": ["token_id:5"], "logprobs": [-0.25], "top": [{"token_id:5": -0.25}]}]
    assert compare(a, a) == {"equal": True, "tokens_equal": True, "max_logprob_abs_diff": 0.0}
    assert compare(a, b) == {"equal": False, "tokens_equal": True, "max_logprob_abs_diff": 0.25}


def test_cl_report_calls_a_gap_within_noise_by_its_standard_error() -> None:
    from bench.report.cl_verdicts import _oa_verdict

    assert _oa_verdict(0.62, 0.61, 800) == "at least as high"
    # 800 rows at p ~ 0.6: the standard error of a difference is ~2.4 points
    assert _oa_verdict(0.615, 0.621, 800).startswith("lower by less than one standard error, 2.4")
    assert _oa_verdict(0.578, 0.621, 800) == "**lower**"
    assert _oa_verdict(0.615, 0.621, None) == "**lower**"


def test_cl_report_pools_the_learned_gate_against_topk_over_runs() -> None:
    from bench.report.cl_verdicts import learned_vs_topk_over_runs

    def rows(jump: float, topk: float) -> list[dict]:
        return [{"variant": "incLoRA+jump", "OA": jump}, {"variant": "incLoRA+topk", "OA": topk}]

    only_jump = [{"variant": "incLoRA+jump", "OA": 0.1}]
    assert learned_vs_topk_over_runs([("a", rows(0.6, 0.62)), ("b", only_jump)], 800) == []
    (sentence,) = learned_vs_topk_over_runs(
        [("a", rows(0.6, 0.62)), ("b", only_jump), ("c", rows(0.5, 0.54))], 800
    )
    # gaps -2 and -4 points: over the runs SE 1.0; each gap's own standard error from 800
    # rows is ~2.4-2.5, so the rows alone allow ~1.7
    assert "2 runs with both (a; c): -2.0, -4.0 points, mean -3.0" in sentence
    assert "(standard error over the runs 1.0; from the evaluation rows alone 1.7)." in sentence
    (unknown_rows,) = learned_vs_topk_over_runs(
        [("a", rows(0.6, 0.62)), ("c", rows(0.5, 0.54))], None
    )
    assert unknown_rows.endswith("mean -3.0 (standard error over the runs 1.0).")


def test_cl_report_shows_runs_with_one_setting_changed_at_the_same_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.report.cl_quality

    budget = {"data": {"order": "short_order_1", "train_rows": 128}, "train": {"lr": 0.001}}
    row = {"variant": "incLoRA+jump", "OA": 0.5}

    def write(tag: str, order: str, overrides: list[str], **changed: dict) -> None:
        settings = {**budget, **changed, "overrides": overrides}
        doc = {"order": order, "settings": json.dumps(settings), "rows": [row]}
        (tmp_path / f"cl_quality_{tag}.json").write_text(json.dumps(doc))

    write("short_order_1", "short_order_1", [])
    write("l0-5", "short_order_1", ["adapter.l0_weight=5"])
    write("seed2", "short_order_1", ["train.seed=43"])
    write("l0-2", "short_order_2", ["adapter.l0_weight=2"])  # another order
    write("sweep", "short_order_1", ["data.tasks=[dbpedia,amazon]", "adapter.l0_weight=0"])
    write("small", "short_order_1", ["adapter.l0_weight=3"], data={"train_rows": 16})
    monkeypatch.setattr(bench.report.cl_quality, "RESULTS", tmp_path)
    primary = json.loads((tmp_path / "cl_quality_short_order_1.json").read_text())
    runs = bench.report.cl_quality._override_runs(primary)
    assert [(label, [r["variant"] for r in rows]) for label, rows in runs] == [
        ("adapter.l0_weight=5", ["incLoRA+jump"]),
        ("train.seed=43", ["incLoRA+jump"]),
    ]


def test_cl_report_shows_one_table_for_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second order and the runs with one setting changed join the primary order's
    table, each row labelled with its order and setting; the verdicts stay per result set."""
    import bench.common
    import bench.report.cl_quality

    budget = {"data": {"order": "short_order_1", "train_rows": 128, "eval_rows": 200}}

    def row(variant: str, oa: float, bwt: float) -> dict:
        return {
            "variant": variant, "OA": oa, "BWT": bwt, "FWT": 0.2, "s_per_step": 1.0,
            "peak_rss_mib": 1, "mean_density": 0.03, "accuracy_matrix": [[0.5] * 4] * 4,
        }  # fmt: skip

    def write(tag: str, order: str, overrides: list[str], rows: list[dict]) -> dict:
        settings = {**budget, "overrides": overrides}
        doc = {"order": order, "settings": json.dumps(settings), "rows": rows}
        doc |= {"model": "smollm2", "created": "now", "machine": {}}
        (tmp_path / f"cl_quality_{tag}.json").write_text(json.dumps(doc))
        return doc

    pair = [row("incLoRA", 0.6, -0.1), row("incLoRA+jump", 0.62, -0.05)]
    primary = write("short_order_1", "short_order_1", [], pair)
    write("short_order_2", "short_order_2", [], [row("incLoRA+jump", 0.5, 0.01)])
    write("seed2", "short_order_1", ["train.seed=43"], pair)
    monkeypatch.setattr(bench.report.cl_quality, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    text = "\n".join(bench.report.cl_quality.section(primary, tmp_path / "img", tmp_path))
    assert text.count("| variant |") == 1
    table = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| inc")]
    assert table == [
        "| incLoRA", "| incLoRA+jump", "| incLoRA (short_order_1, train.seed=43)",
        "| incLoRA+jump (short_order_1, train.seed=43)", "| incLoRA+jump (short_order_2)",
    ]  # fmt: skip
    assert "- incLoRA+jump vs incLoRA: BWT -5.0 vs -10.0 (forgets less)" in text
    assert "- short_order_1, train.seed=43: incLoRA+jump vs incLoRA: BWT -5.0" in text


def test_cl_report_shows_an_ablation_beside_the_default_and_the_eval_time_before_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ablation's run sits beside the regime's default run of the same variant and seed;
    a long stream's two timed variants give the ratio of their times, and the metrics'
    agreement is read, not assumed."""
    import bench.common
    import bench.report.cl_eval_time
    import bench.report.cl_regimes

    def row(variant: str, oa: float, bwt: float, **extra: float | None) -> dict:
        settings = {"data": {"order": "long_order_4", "train_rows": 16, "eval_rows": 10}}
        return {
            "variant": variant, "OA": oa, "BWT": bwt, "FWT": 0.2, "mean_density": 0.02,
            "base_row": [0.0] * 3, "accuracy_matrix": [[0.5, None, None], [0.5, 0.5, 0.1],
            [0.5, 0.5, 0.5]], "train_s": 10.0, "load_average": [1.0, 2.0, 3.0],
            "settings": {**settings, "overrides": ["train.seed=1"]}, **extra,
        }  # fmt: skip

    def write(tag: str, rows: list[dict]) -> None:
        (tmp_path / f"cl_quality_{tag}.json").write_text(json.dumps({"rows": rows}))

    write("so1-x4-seed1", [row("incLoRA+jump", 0.55, -0.215)])
    write("so1-x4-seed1-per-block", [row("incLoRA+jump", 0.57, -0.18)])
    write("so1-x4-seed1-unknown", [row("incLoRA+jump", 0.1, -0.9)])  # no such ablation
    write("so1-x4-seed2", [row("incLoRA+jump", 0.6, -0.1, eval_s=50.0)])
    write("so1-x4-seed2-per-block", [row("incLoRA+jump", 0.58, -0.14)])
    write("so1-x4-seed1-no-refit", [row("incLoRA+jump", 0.5, -0.3)])  # one seed: no pairing
    monkeypatch.setattr(bench.report.cl_regimes, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)  # read_result's folder
    text = "\n".join(bench.report.cl_regimes.section({}))
    assert "- Ablation `per-block`, one learned threshold per block" in text
    assert "incLoRA+jump, seed 1: OA 57.0, BWT -18.0, mean density 2.00 % (the default: " \
        "OA 55.0, BWT -21.5, 2.00 %); seed 2: " in text  # fmt: skip
    assert "-90.0" not in text
    # two seeds with the default: the difference paired by seed (+3.5 and -4.0 of BWT,
    # +2 and -2 of OA)
    assert "(the default: OA 60.0, BWT -10.0, 2.00 %); minus the default on seeds 1, 2: " \
        "BWT -0.3 ± 3.8; OA +0.0 ± 2.0." in text  # fmt: skip
    assert "- Ablation `no-refit`, trained dense and cut once" in text
    assert "`no-refit` minus" not in text
    # seed 1's row has no eval time: the mean says which seeds it is over
    assert "| 2.00 | 10 | 50 (seed 2) |" in text
    assert bench.report.cl_eval_time.section({}) == []  # nothing timed yet
    write("lo4-small-full-in_process", [row("incLoRA", 0.4, -0.1, eval_s=300.0, wall_s=400.0)])
    write("lo4-small-needed-vllm", [row("incLoRA", 0.4, -0.1, eval_s=100.0, wall_s=200.0)])
    text = "\n".join(bench.report.cl_eval_time.section({}))
    assert "| before: the whole matrix, in process | 10 | 300 | 10 | 400 | 40.0 | -10.0 |" in text
    assert "evaluation 3.0x shorter, whole variant 2.0x shorter" in text
    assert "OA, BWT and FWT are identical" in text
    write("lo4-small-needed-vllm", [row("incLoRA", 0.41, -0.1, eval_s=100.0, wall_s=None)])
    text = "\n".join(bench.report.cl_eval_time.section({}))
    assert "evaluation 3.0x shorter (one run" in text  # no whole time for a resumed variant
    assert "differ" in text


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
    from bench.cl_quality import run_variant
    from tests.conftest import TWO_TASKS

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
    from bench.cl_quality import run_variant, variant_adapter
    from tests.conftest import TWO_TASKS

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
    from bench.cl_quality import server_folder

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
    from bench.cl_quality import VARIANTS, check_configs

    base = {"model": "m", "data": {"order": "short_order_1"}, "adapter": {"r": 8}, "train": {}}
    check_configs(list(VARIANTS), base, [])
    check_configs(["incLoRA", "incLoRA+jump"], base, ["adapter.l0_weight=5"])
    with pytest.raises(SystemExit, match=r"incLoRA\+jump-ref: .*reference sets l0_weight"):
        check_configs(list(VARIANTS), base, ["adapter.l0_weight=5"])


def test_interference_stats_see_overlap_and_undoing() -> None:
    """An update on the earlier task's coordinates in the opposite direction reads as full
    overlap and cosine -1; one on fresh coordinates as no overlap and cosine 0."""
    from bench.interference import update_stats

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
    from bench.interference import _top_mask

    a, b = torch.zeros(1000), torch.zeros(1000)
    a[3], b[7] = 1.0, 2.0
    assert (
        int(_top_mask(a, 0.05).sum()) == 1 and not (_top_mask(a, 0.05) & _top_mask(b, 0.05)).any()
    )
    assert not _top_mask(torch.zeros(10), 0.5).any()


def test_interference_output_change_is_relative_and_sees_input_directions() -> None:
    from bench.interference import output_change

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
    from bench.interference import loss_summary

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
    _run([*args, "--merge-scales", "0.5"], tmp_path)  # measured with the rest
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
    _run([*args, "--remeasure"], tmp_path)
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
    from bench.cl_quality import run_variant

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


def test_cl_regimes_pool_seeds_and_decide_the_regime_only_at_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.report.cl_regimes as regimes

    def row(variant: str, oa: float, bwt: float) -> dict:
        return {"variant": variant, "OA": oa, "BWT": bwt, "FWT": 0.2, "mean_density": 0.03}

    def write(seed: int, rows: list[dict]) -> None:
        doc = {"rows": rows}
        (tmp_path / f"cl_quality_so1-x4-seed{seed}.json").write_text(json.dumps(doc))

    monkeypatch.setattr(regimes, "RESULTS", tmp_path)
    write(1, [row("incLoRA", 0.50, -0.10), row("incLoRA+jump", 0.48, -0.14)])
    write(2, [row("incLoRA", 0.52, -0.06)])
    lines = regimes.section({})
    text = "\n".join(lines)
    assert "| incLoRA | 1, 2 | 51.0 ± 1.0 | -8.0 ± 2.0 | -10.0, -6.0 |" in text
    assert "not decided yet (2 of 3 seeds)" in text
    # paired only where both ran: seed 1
    assert "incLoRA+jump minus incLoRA on seed 1: BWT -4.0; OA -2.0." in text
    assert "lo4" not in text  # no results of the other regime: no table

    write(3, [row("incLoRA", 0.51, -0.02), row("incLoRA+jump", 0.50, -0.01)])
    text = "\n".join(regimes.section({}))
    assert "over 3 seed(s): **a forgetting regime**" in text  # mean -6.0 <= -5
    assert "seqLoRA" not in text  # not run: no line
    for seed, bwt in ((1, -0.30), (2, -0.40), (3, -0.35)):
        doc = json.loads((tmp_path / f"cl_quality_so1-x4-seed{seed}.json").read_text())
        write(seed, [*doc["rows"], row("seqLoRA", 0.40, bwt)])
    text = "\n".join(regimes.section({}))
    assert "seqLoRA (dense) BWT -35.0 ± 2.9 over 3 seed(s): forgets" in text
    assert "incLoRA+jump minus incLoRA on seeds 1, 3: BWT -1.5 ± 2.5; OA -1.5 ± 0.5." in text
    write(2, [row("incLoRA", 0.52, 0.06)])  # mean -2.0
    assert "not a forgetting regime" in "\n".join(regimes.section({}))
    # the GPU replicate (another evaluator) is its own regime, never pooled with the CPU's
    gpu = {"rows": [row("incLoRA", 0.60, -0.20)]}
    (tmp_path / "cl_quality_so1-x4-gpu-seed1.json").write_text(json.dumps(gpu))
    text = "\n".join(regimes.section({}))
    assert "Regime `so1-x4-gpu`" in text and "| incLoRA | 1 | 60.0 | -20.0 | -20.0 |" in text
    assert "| incLoRA | 1, 2, 3 | 51.0 ± 0.6 |" in text  # so1-x4's seeds as they were


def test_machine_line_names_the_gpu_only_where_there_is_one() -> None:
    from bench.common import machine_line

    cpu = {"cpu_model": "Xeon", "cpu_count": 2, "torch": "2.13.0", "transformers": "5.19.0"}
    assert "CUDA" not in machine_line(cpu)
    line = machine_line({**cpu, "gpu": "NVIDIA H200", "cuda": "13.0"})
    assert "Xeon, 2 cores | NVIDIA H200 (CUDA 13.0) | torch 2.13.0" in line


def test_a_result_file_names_the_machine_of_each_row_not_of_its_render() -> None:
    from bench.common import machine_line, rows_machine_lines

    amd = {"cpu_model": "AMD EPYC", "cpu_count": 2, "torch": "2.13.0"}
    xeon = {**amd, "cpu_model": "Xeon"}
    same = [{"variant": "incLoRA", "machine": amd}, {"variant": "seqLoRA", "machine": amd}]
    assert rows_machine_lines(same, xeon) == ["Machine: " + machine_line(amd)]
    mixed = rows_machine_lines([*same, {"variant": "incLoRA+jump"}], xeon)  # row has none
    assert len(mixed) == 2
    assert mixed[0].startswith("Machine: AMD EPYC") and mixed[0].endswith("(incLoRA, seqLoRA)")
    assert mixed[1].startswith("Machine: Xeon") and mixed[1].endswith("(incLoRA+jump)")


def test_the_gpu_regime_script_runs_each_seeds_chain_and_measures_its_key_runs(
    tmp_path: Path,
) -> None:
    """bench/forgetting_regime_gpu.sh's orchestration, with a stand-in for Python that
    records each call and writes the row a finished variant leaves (the benchmarks it
    calls have their own tests): the chain's order, the measurements once a row is in, a
    chain's end marked, the budget checked."""
    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "forgetting_regime_gpu.sh"
    shutil.copy(REPO / "bench" / "forgetting_regime_gpu.sh", script)
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >> calls.log\n'
        'if [ "$2" = bench.cl_quality ]; then\n'
        '  tag=$(sed -E "s/.*--tag ([^ ]+).*/\\1/" <<< "$*")\n'
        '  mkdir -p "bench/results/cl_quality/$tag" && touch "bench/results/cl_quality/$tag/${@: -1}.json"\n'
        "fi\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake)}
    done = subprocess.run(
        ["bash", str(script), "60"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert "== forgetting regime (GPU)" in done.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    trained = [c for c in calls if "bench.cl_quality" in c]
    chain = [c.split("--variants ")[1] for c in trained if "--tag so1-x4-gpu-seed2 " in c]
    assert chain == [
        "incLoRA+jump", "incLoRA", "incLoRA+topk", "incLoRA+topk@jump", "seqLoRA",
        "incLoRA+jump-ref", "ella", "ella+jump", "inflora", "inflora+jump",
    ]  # fmt: skip
    assert [c.split("--variants ")[1] for c in trained if "--tag lo4-gpu-seed2 " in c] == [
        "incLoRA", "seqLoRA",
    ]  # fmt: skip
    measured = [c for c in calls if "bench.interference" in c and "so1-x4-gpu-seed2 " in c]
    assert [c.split("--variants ")[1] for c in measured] == [
        "incLoRA+jump --merge-scales 0.5 0.75",
        "incLoRA --merge-scales 0.5 0.75",
        "incLoRA+topk --merge-scales 0.5 0.75",
        "incLoRA+topk@jump --merge-scales 0.5 0.75",
    ]
    logs = tmp_path / "runs" / "forgetting_regime_gpu"
    assert {p.name for p in logs.glob("*.done")} >= {"seed-1.done", "seed-2.done", "seed-3.done"}
    for budget in ("0", "soon"):
        refused = subprocess.run(
            ["bash", str(script), budget], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 2 and "above 0" in refused.stderr


def test_the_cpu_attention_section_shows_both_kernels_and_their_ratios(tmp_path: Path) -> None:
    from bench.report import cpu_attention

    def kernel(prefill_s: float, tok_per_s: float) -> dict:
        return {
            "prefill_16": {"prompt_tokens": 225, "median_s": prefill_s},
            "decode_tok_per_s": tok_per_s,
        }

    machine = {"cpu_model": "Xeon", "cpu_count": 2, "loadavg_at_start": 1.0}
    doc = {
        "created": "2026-12-04T18:00:00+00:00", "quick": False, "command": "python -m bench.cpu_attention",
        "machine": machine, "repeats": 7, "load_average_end": [1.0, 1.5, 2.0],
        "model": "/models/smollm2", "decode_tokens": 64,
        "kernels": {"default": kernel(0.5, 20.0), "amx": kernel(0.4, 25.0)},
        "ratios_default_over_amx": {"prefill_16_time": 1.25, "decode_tok_per_s": 0.8},
    }  # fmt: skip
    text = "\n".join(cpu_attention.section(doc, tmp_path, tmp_path))
    assert "| prefill, 225-token prompt (s) | 0.500 | 0.400 | 1.25 |" in text
    assert "| decode, 64 tokens (tokens/s) | 20.0 | 25.0 | 0.80 |" in text
    assert "medians of 7 repeats" in text
