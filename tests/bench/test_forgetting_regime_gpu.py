"""bench/forgetting_regime_gpu.sh's orchestration, with a stand-in for Python."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers.bench import REPO


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
