"""Smoke test of the benchmark scripts on the tiny model: they run, write their JSON and the
report renders. No timing is asserted (the machine is shared); no server benchmark runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers.bench import REPO, run_bench_module


def test_scripts_run_and_report_renders(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = str(tiny_model_dir)
    run_bench_module(["bench.delta_size", "--quick", "--model", model], tmp_path)
    train = ["bench.train_step", "--quick", "--model", model, "--rounds", "1"]
    run_bench_module([*train, "--variants", "jumplora", "lora-trainer"], tmp_path)
    run_bench_module([*train, "--padding"], tmp_path)
    # bench/scale.py takes half an hour even quick: render its committed quick result.
    shutil.copy(REPO / "bench" / "results" / "scale_quick.json", tmp_path)
    run_bench_module(["bench.report", "--quick"], tmp_path)
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
