"""Admin CLI start-up: time from starting `jlserve status` to its first request.

    .venv/bin/python -m bench.admin_cli            # 15 runs each
    .venv/bin/python -m bench.admin_cli --quick    # 5 runs each

A swap takes tens of milliseconds, so the CLI's own start is most of what a user waits
for. The CLI is started against a local socket that records when the request arrives
(no server needed); wall time and the child's CPU time are measured. Alternatives in
the same run: a bare `python -c pass` (the floor) and the same command with torch
imported first (what the admin path cost while its schemas imported the engine
protocol, which imported torch). Writes bench/results/admin_cli[_quick].json.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time

from bench.common import REPO, bench_env, median, ratio, write_result

WITH_TORCH = "import torch, runpy, sys; sys.argv[0] = 'jlserve'; runpy.run_module('jlserve', run_name='__main__')"


def first_request_times(argv: list[str], runs: int) -> dict[str, float]:
    """Median seconds from start to the first request, and the child's median CPU time."""
    walls, cpus = [], []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        for _ in range(runs):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.Popen(
                [*argv, "status", "--url", url],
                env=bench_env(PYTHONPATH=str(REPO)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            conn, _ = listener.accept()
            walls.append(time.perf_counter() - start)
            conn.close()  # the CLI then reports an unreachable server and exits
            proc.wait(timeout=60)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return {"median_s": median(walls), "median_cpu_s": median(cpus), "runs": runs}


def bare_python(runs: int) -> dict[str, float]:
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        walls.append(time.perf_counter() - start)
    return {"median_s": median(walls), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 runs each instead of 15")
    args = parser.parse_args()
    runs = 5 if args.quick else 15
    load_before = os.getloadavg()[0]
    light = first_request_times([sys.executable, "-m", "jlserve"], runs)
    heavy = first_request_times([sys.executable, "-c", WITH_TORCH], runs)
    floor = bare_python(runs)
    rows = {"jlserve_status": light, "with_torch_imported": heavy, "python_c_pass": floor}
    for name, row in rows.items():
        print(f"{name}: median {row['median_s']:.3f} s", flush=True)
    write_result(
        "admin_cli",
        args.quick,
        {
            "results": rows,
            "speedup_vs_with_torch": ratio(heavy["median_s"], light["median_s"]),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
