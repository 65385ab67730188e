"""Serving benchmark: throughput and latency of `jlserve serve` against plain vLLM on the same
checkpoint, and against vLLM serving the same tasks as separate runtime LoRA adapters.

    .venv/bin/python -m bench.serving             # SmolLM2, 3 rounds, concurrency 1 4 8 (~12 min)
    .venv/bin/python -m bench.serving --quick     # 1 round, concurrency 1 4 (~4 min)

Servers (one at a time: 2 cores), all with bench.common.ENGINE_ARGS (eager on CPU):
- `jlserve`: `jlserve serve` on the checkpoint (one merged model, no task id);
- `vllm`: `python -m vllm.entrypoints.openai.api_server` on the same checkpoint;
- `vllm-lora`: the same plus `--enable-lora --max-lora-rank 8 --max-loras T --lora-modules
  task1=DIR ...`: T random r=8 q/v PEFT adapters (one per task), requests round-robin over
  the adapter names (the task id users must send).
Request mix: streaming /v1/completions, fixed prompt, fixed max_tokens, ignore_eos, greedy.
Each round starts every server in turn (order rotated per round), warms it up with two
requests, then runs each concurrency level; medians over rounds. The ratios are over
plain vLLM (target for jlserve: throughput >= 0.97). Writes bench/results/serving[_quick].json.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    LOGS,
    Server,
    add_common_args,
    jlserve_server,
    median,
    ratio,
    require_model,
    run_load,
    vllm_server,
    write_lora_adapter,
    write_result,
)

SERVERS = ("jlserve", "vllm", "vllm-lora")
METRICS = ("tok_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


def make_servers(model: Path, work: Path, n_tasks: int) -> dict[str, Callable[[], Server]]:
    adapters = [
        write_lora_adapter(model, work / f"lora-task{i + 1}", r=8, seed=i) for i in range(n_tasks)
    ]
    lora_args = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", str(n_tasks)]
    lora_args += ["--lora-modules", *(f"task{i + 1}={p}" for i, p in enumerate(adapters))]
    return {
        "jlserve": lambda: jlserve_server(model, work / "state", LOGS / "serving_jlserve.log"),
        "vllm": lambda: vllm_server(model, LOGS / "serving_vllm.log"),
        "vllm-lora": lambda: vllm_server(
            model, LOGS / "serving_vllm_lora.log", lora_args, label="vllm-lora"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="default 64 (quick: 32)")
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests = this * c")
    parser.add_argument("--tasks", type=int, default=4, help="LoRA adapters (task ids)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    args = parser.parse_args()
    require_model(args.model)
    rounds = args.rounds or (1 if args.quick else 3)
    levels = args.concurrency or ([1, 4] if args.quick else [1, 4, 8])
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    deadline_s = 240.0  # per load level: bounded in time as well as in count

    runs: list[dict[str, Any]] = []
    startups: dict[str, list[float]] = {name: [] for name in args.servers}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        factories = make_servers(args.model, Path(tmp), args.tasks)
        for rnd in range(rounds):
            shift = rnd % len(args.servers)
            for name in args.servers[shift:] + args.servers[:shift]:
                server = factories[name]()
                task_ids = (
                    [f"task{i + 1}" for i in range(args.tasks)] if name == "vllm-lora" else None
                )
                try:
                    server.start()
                    startups[name].append(server.wait_first_completion())
                    print(f"round {rnd + 1}: {name} up in {startups[name][-1]:.1f} s", flush=True)
                    # warm-up, not recorded (vllm-lora: loads every adapter once)
                    run_load(server, 2, len(task_ids or [0, 0]), max_tokens, deadline_s, task_ids)
                    for c in levels:
                        # vllm-lora: request i names task (i mod T)'s adapter (the task id).
                        n = max(args.requests_per_slot * c, 4)
                        stats = run_load(server, c, n, max_tokens, deadline_s, task_ids)
                        runs.append({"server": name, "round": rnd, **stats})
                        print(
                            f"  c={c}: {stats['tok_per_s']:.1f} tok/s, TTFT p50 "
                            f"{stats['ttft_p50_s'] * 1e3:.0f} ms, TPOT p50 "
                            f"{stats['tpot_p50_s'] * 1e3:.1f} ms ({stats['ok']}/"
                            f"{stats['requests']} ok)",
                            flush=True,
                        )
                finally:
                    server.stop()

    summary: list[dict[str, Any]] = []
    for c in levels:
        row: dict[str, Any] = {"concurrency": c}
        for name in args.servers:
            rows = [r for r in runs if r["server"] == name and r["concurrency"] == c]
            row[name] = {m: median([r[m] for r in rows]) for m in METRICS}
        if "vllm" in row:
            for name in args.servers:
                if name != "vllm":
                    row[f"{name}_over_vllm"] = {
                        m: ratio(row[name][m], row["vllm"][m]) for m in METRICS
                    }
        summary.append(row)
    ratios = [r["jlserve_over_vllm"]["tok_per_s"] for r in summary if "jlserve_over_vllm" in r]
    write_result(
        "serving",
        args.quick,
        {
            "model": str(args.model),
            "rounds": rounds,
            "concurrency": levels,
            "max_tokens": max_tokens,
            "lora_tasks": args.tasks,
            "startup_s": startups,
            "summary": summary,
            "runs": runs,
            "target": {
                "jlserve_over_vllm_tok_per_s_min": 0.97,
                "worst_ratio": min(ratios) if ratios else None,
                "met": bool(ratios) and min(ratios) >= 0.97,
            },
        },
    )


if __name__ == "__main__":
    main()
