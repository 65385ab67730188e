"""Run every benchmark, then render docs/benchmarks.md (full) or
bench/results/benchmarks_quick.md (quick) with tables and PNG plots.

    make bench           # .venv/bin/python -m bench.run_all          (< 60 min on 2 cores)
    make bench-quick     # .venv/bin/python -m bench.run_all --quick  (< 10 min)
    .venv/bin/python -m bench.run_all --only hot_swap serving   # a subset, then the page
    .venv/bin/python -m bench.run_all --report-only             # re-render from the JSONs
    .venv/bin/python -m bench.run_all --cl                      # also run bench/cl_quality.py

The CL-quality benchmark (bench/cl_quality.py, the trainer's script) takes 30-40 min even
at the reduced budget below, so it runs only with `--cl`; otherwise the page shows the
latest bench/results/cl_quality[_quick].json. Each benchmark runs in its own process, one
after the other (never two at once: the timings would disturb each other); a failing one
is reported and the others still run. Exit status 1 if any failed.

Three benchmarks run on their own commands, never from here, and the page shows their
latest JSON (sections 7 to 9): `python -m bench.scale` (a random 1.5 B Llama of its own, no
`--model`; about 30-40 min on 2 quiet cores), `python -m bench.gpu_check` (needs one GPU
and CUDA vLLM) and `python -m bench.cpu_attention` (needs a CPU with AMX).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_MODEL, REPO, bench_env, require_model
from bench.report import render

BENCHMARKS = ("delta_size", "hot_swap", "serving", "train_step")
# Reduced CL budget that fits ~30-40 min on 2 shared cores (the 256/200/256
# budget takes hours there); see docs/benchmarks.md section 5.
CL_ARGS = ("--train-rows", "32", "--eval-rows", "32", "--max-length", "128")


def run(cmd: list[str]) -> tuple[bool, float]:
    print(f"\n=== {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    ok = subprocess.run(cmd, cwd=REPO, env=bench_env()).returncode == 0
    seconds = time.perf_counter() - start
    print(f"=== {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    return ok, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--cl", action="store_true", help="also run bench/cl_quality.py")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    failed: list[str] = []
    if not args.report_only:
        require_model(args.model)
        quick = ["--quick"] if args.quick else []
        durations = {}
        for name in args.only:
            cmd = [sys.executable, "-m", f"bench.{name}", "--model", str(args.model), *quick]
            ok, durations[name] = run(cmd)
            if not ok:
                failed.append(name)
        if args.cl:
            cl = [sys.executable, "-m", "bench.cl_quality"]
            cl += ["--quick"] if args.quick else ["--model", str(args.model), *CL_ARGS]
            ok, durations["cl_quality"] = run(cl)
            if not ok:
                failed.append("cl_quality")
        print("\ndurations: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()))
    render(args.quick)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
