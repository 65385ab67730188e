"""bench/report's sections rendered from hand-written results: the CL quality report, its
regimes and eval times, and the CPU attention section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


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
    assert "seeds; the mean is within one standard error of it)" in text  # -6.0 ± 2.3
    assert "seqLoRA" not in text  # not run: no line
    for seed, bwt in ((1, -0.30), (2, -0.40), (3, -0.35)):
        doc = json.loads((tmp_path / f"cl_quality_so1-x4-seed{seed}.json").read_text())
        write(seed, [*doc["rows"], row("seqLoRA", 0.40, bwt)])
    text = "\n".join(regimes.section({}))
    assert (
        "seqLoRA (dense) BWT -35.0 ± 2.9 over 3 seed(s): forgets (the bar: <= -5 in the mean over >= 3 seeds)."
        in text
    )
    assert "incLoRA+jump minus incLoRA on seeds 1, 3: BWT -1.5 ± 2.5; OA -1.5 ± 0.5." in text
    write(2, [row("incLoRA", 0.52, 0.06)])  # mean -2.0
    assert "not a forgetting regime" in "\n".join(regimes.section({}))
    # the GPU replicate (another evaluator) is its own regime, never pooled with the CPU's
    gpu = {"rows": [row("incLoRA", 0.60, -0.20)]}
    (tmp_path / "cl_quality_so1-x4-gpu-seed1.json").write_text(json.dumps(gpu))
    text = "\n".join(regimes.section({}))
    assert "Regime `so1-x4-gpu`" in text and "| incLoRA | 1 | 60.0 | -20.0 | -20.0 |" in text
    assert "| incLoRA | 1, 2, 3 | 51.0 ± 0.6 |" in text  # so1-x4's seeds as they were


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
