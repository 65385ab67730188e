"""What the benchmark script tests share: the checkout they run in and how a script is
run there, its results written to a given folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT as REPO


def run_bench_module(args: list[str], results: Path) -> None:
    """`python -m <args>` in the checkout, writing its results under `results`."""
    env = {**os.environ, "JLSERVE_BENCH_RESULTS": str(results)}
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, check=True, timeout=300)
