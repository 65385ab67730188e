"""Evaluation engine benchmark (issue 24, point 2): the accuracy matrix's greedy evaluation
in process (transformers `generate`, what the trainer runs by default) against the same
prompts through vLLM (a `jlserve serve` on the same checkpoint, what `--eval-via URL`
uses), on the CL benchmark's dev rows.

    .venv/bin/python -m bench.eval_engine                 # SmolLM2, 4 tasks x 200 rows, 3 rounds
    .venv/bin/python -m bench.eval_engine --quick         # tiny random model, pip-built tasks

Both sides get the same token-id prompts (the trainer's Encoder, plain format) and the same
stop token and length, in fp32 (the trainer's CPU precision; the server runs
`--dtype float32`), so the answers should agree; the script counts the prompts whose
answers differ. Time: per task, the two engines alternate round after round in one
process (the server stays up; its start is reported apart), median over rounds; the load
average is recorded, since another job on the machine shifts both. Writes
bench/results/eval_engine[_quick].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    ENGINE_ARGS,
    REPO,
    add_common_args,
    jlserve_server,
    median,
    ratio,
    require_model,
    running,
    write_result,
)
from trainer.config import default_data_root

TASKS = ["dbpedia", "amazon", "yahoo", "agnews"]  # short_order_1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--data", type=Path, default=default_data_root(), help="a root in the CL layout"
    )
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="both engines")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import DataConfig
    from trainer.data import Encoder, generate_greedy, load_stream, score
    from trainer.served import ServedModel

    scratch = Path(tempfile.mkdtemp(prefix="eval_engine-"))
    model_dir, data, tasks, rows, rounds = (
        args.model,
        args.data,
        args.tasks,
        args.eval_rows,
        args.rounds,
    )
    if args.quick:
        from jlserve.models.tiny import build_tiny_llama
        from trainer.demo_data import build_demo_benchmark

        model_dir = build_tiny_llama(scratch / "tiny")
        data = build_demo_benchmark(scratch / "data", cache_dir=REPO / ".cache", train_rows=8)
        tasks, rows, rounds = ["movie_sentiment", "tweet_sentiment"], 32, 2
    require_model(model_dir)
    cfg = DataConfig(root=data, tasks=tasks, eval_rows=rows, max_length=args.max_length)
    stream = load_stream(cfg, seed=42)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = Encoder(tokenizer, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    device = torch.device("cpu")

    server = jlserve_server(
        model_dir, scratch / "state", scratch / "server.log", (*ENGINE_ARGS, "--dtype", "float32")
    )
    per_task: dict[str, dict] = {}
    with running(server) as start_s:
        served = ServedModel(server.url, batch_size=args.batch_size)
        fp = served_fingerprint(server.url)
        served.wait_for_fingerprint(fp)
        for task in stream:
            prompts, n = enc.eval_prompts(task), enc.max_target_len(task)
            times: dict[str, list[float]] = {"in_process": [], "vllm": []}
            answers: dict[str, list[str]] = {}
            for _ in range(rounds):
                t0 = time.perf_counter()
                answers["in_process"] = generate_greedy(
                    model, enc, prompts, n, args.batch_size, device
                )
                times["in_process"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                answers["vllm"] = served.generate(
                    prompts, max_new_tokens=n, stop_token=enc.stop, fingerprint=fp
                )
                times["vllm"].append(time.perf_counter() - t0)
            differ = sum(
                a != b for a, b in zip(answers["in_process"], answers["vllm"], strict=True)
            )
            per_task[task.name] = {
                "rows": len(prompts),
                "max_new_tokens": n,
                "seconds": {k: median(v) for k, v in times.items()},
                "all_seconds": times,
                "speedup_vllm": ratio(median(times["in_process"]), median(times["vllm"])),
                "answers_differ": differ,
                "exact": {k: score(task, v).exact for k, v in answers.items()},
            }
            print(task.name, per_task[task.name]["seconds"], f"differ {differ}", flush=True)
        served.close()
    total = {k: sum(t["seconds"][k] for t in per_task.values()) for k in ("in_process", "vllm")}
    doc = {
        "model": "tiny random Llama (quick)" if args.quick else str(model_dir),
        "tasks": per_task,
        "total_seconds": total,
        "speedup_vllm": ratio(total["in_process"], total["vllm"]),
        "answers_differ": sum(t["answers_differ"] for t in per_task.values()),
        "rows": sum(t["rows"] for t in per_task.values()),
        "server_start_s": start_s,
        "settings": {
            "batch_size": args.batch_size,
            "rounds": rounds,
            "max_length": args.max_length,
            "torch_threads": torch.get_num_threads(),
        },
        "load_average": os.getloadavg(),
    }
    path = write_result("eval_engine", args.quick, doc)
    print(f"in process {total['in_process']:.1f} s, vLLM {total['vllm']:.1f} s "
          f"({doc['speedup_vllm']:.2f}x), answers differ on {doc['answers_differ']} of "
          f"{doc['rows']} prompts; {path}")  # fmt: skip
    return 0


def served_fingerprint(url: str) -> str:
    """The fingerprint the server reports for the model it serves."""
    import httpx

    from trainer.served import FINGERPRINT_HEADER

    return httpx.get(f"{url}/v1/models", timeout=30).headers[FINGERPRINT_HEADER]


if __name__ == "__main__":
    sys.exit(main())
