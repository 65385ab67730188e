"""How much of the earlier tasks' input energy InfLoRA's memory covers (issue 24, point 3).

    .venv/bin/python -m bench.inflora_memory runs/bench/cl_quality/so1-x4-seed1/inflora \\
        --tag so1-x4-seed1-inflora

InfLoRA keeps a task's update zero only on its memory: per adapted layer an orthonormal
(d_in, k) basis of the earlier tasks' input directions (trainer.subspace). Its size is set
by the share of the *squared* singular values of the input covariance (the authors'
criterion), which a few large directions reach. This reads a finished run's last memory and
its last merged model, collects every adapted layer's input covariance C on `--rows` dev
prompts of each task, and reports per task:

  in_memory  tr(M^T C M) / tr(C): the share of the task's input energy inside the span
             the later updates must spare (the rest is where they act freely);
  own_top_k  the share its own top-k eigen directions hold (k = the memory's size in that
             layer): how concentrated the inputs are.

Writes bench/results/inflora_memory_<tag>.json (per task: mean, min, max over layers).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from bench.common import RESULTS, machine_info
from jlserve.fsutil import atomic_write_bytes
from trainer.config import load_config
from trainer.data import Encoder, load_stream
from trainer.errors import TrainerError
from trainer.layout import read_json
from trainer.methods import InfLoRA
from trainer.subspace import input_covariances


def coverage(cov: Tensor, basis: Tensor) -> tuple[float, float]:
    """(in_memory, own_top_k) of one layer: cov (d_in, d_in), basis (d_in, k) orthonormal."""
    cov = cov.double()
    basis = basis.to(cov.dtype)
    total = torch.trace(cov)
    in_memory = torch.trace(basis.T @ cov @ basis) / total
    eigenvalues = torch.linalg.eigvalsh(cov).flip(0)  # decreasing
    own_top_k = eigenvalues[: basis.shape[1]].sum() / total
    return float(in_memory), float(own_top_k)


def _spread(values: tuple[float, ...]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def _last_version(run_dir: Path) -> dict[str, str]:
    """The last version run.json commits (its merged folder and method-state file): files
    of a task that was being written when the run stopped are not read."""
    versions = read_json(run_dir / "run.json")["versions"]
    if len(versions) < 2 or not versions[-1].get("merged"):
        raise TrainerError(f"{run_dir}: no finished task with a merged checkpoint")
    return versions[-1]


def measure(run_dir: Path, rows: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per task of the run's stream: in_memory and own_top_k (mean, min, max over layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(run_dir / "config.yaml")
    if cfg.method.name != "inflora":
        raise TrainerError(f"{run_dir}: method {cfg.method.name}, not inflora")
    last = _last_version(run_dir)
    memory = load_file(run_dir / "state" / last["state"])
    suffix = "." + InfLoRA.STATE_KEY
    names = [k.removesuffix(suffix) for k in memory if k.endswith(suffix)]
    model = AutoModelForCausalLM.from_pretrained(
        run_dir / "merged" / last["merged"], dtype=torch.float32
    ).eval()
    enc = Encoder(AutoTokenizer.from_pretrained(cfg.model), cfg.data.max_length,
                  cfg.data.prompt_format)  # fmt: skip
    result = {}
    for task in load_stream(cfg.data, cfg.train.seed):
        prompts = enc.eval_prompts(task)[:rows]

        def feed(prompts: list[list[int]] = prompts) -> None:
            for ids in prompts:
                tokens = torch.tensor([ids])  # (1, L)
                model(input_ids=tokens, attention_mask=torch.ones_like(tokens))

        with torch.no_grad():
            covariances = input_covariances(model, names, feed)
        in_memory, own_top_k = zip(
            *(coverage(covariances[n], memory[n + suffix]) for n in names), strict=True
        )
        result[task.name] = {"in_memory": _spread(in_memory), "own_top_k": _spread(own_top_k)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished InfLoRA run folder")
    parser.add_argument("--tag", required=True, help="bench/results/inflora_memory_<tag>.json")
    parser.add_argument("--rows", type=int, default=64, help="dev prompts per task")
    args = parser.parse_args(argv)
    try:
        tasks = measure(args.run, args.rows)
    except TrainerError as exc:
        parser.exit(2, f"inflora_memory: {exc}\n")
    out = RESULTS / f"inflora_memory_{args.tag}.json"
    doc = {"run": args.run.name, "rows": args.rows, "tasks": tasks, "machine": machine_info()}
    atomic_write_bytes(out, (json.dumps(doc, indent=1) + "\n").encode())
    for name, stats in tasks.items():
        print(f"{name}: in memory {100 * stats['in_memory']['mean']:.1f} % "
              f"({100 * stats['in_memory']['min']:.1f}-{100 * stats['in_memory']['max']:.1f}), "
              f"own top-k {100 * stats['own_top_k']['mean']:.1f} %")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
