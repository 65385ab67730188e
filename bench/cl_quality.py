"""CL quality and speed benchmark: OA, BWT, delta density, train s/step and peak RSS of the
continual-learning methods with and without the JumpLoRA gate, on one task order.

    .venv/bin/python -m bench.cl_quality                    # SmolLM2-135M, short_order_1
    .venv/bin/python -m bench.cl_quality --model DIR --train-rows 256 --eval-rows 200
    .venv/bin/python -m bench.cl_quality --quick               # tiny random model, smoke test

Each variant runs in its own process (`python -m trainer`), so peak RSS is per variant.
Writes bench/results/cl_quality[_quick].json and .md, with the machine and versions.
The speed line is the train step-time ratio incLoRA+jump / incLoRA (same model, batch,
length): the issue's target is <= 1.5 on CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import machine_info, machine_line

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cl_benchmark"

# name -> (method, gate)
VARIANTS: dict[str, tuple[str, str]] = {
    "incLoRA": ("incLoRA", "none"),
    "incLoRA+jump": ("incLoRA", "jump"),
    "ella": ("ella", "none"),
    "ella+jump": ("ella", "jump"),
    "seqLoRA": ("seqLoRA", "none"),
    "olora": ("olora", "none"),
}


def run_variant(name: str, base_cfg: dict, work: Path) -> dict:
    method, gate = VARIANTS[name]
    cfg = {**base_cfg, "method": {"name": method}, "adapter": {**base_cfg["adapter"], "gate": gate}}
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = work / name.replace("+", "_")
    cmd = [sys.executable, "-m", "trainer", "--config", str(cfg_path), "--out", str(out)]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    metrics = json.loads((out / "metrics.json").read_text())
    tasks = metrics["tasks"]
    acc = metrics["accuracy"]
    return {
        "variant": name,
        "OA": acc["OA"],
        "OA_prefix": acc["OA_prefix"],
        "BWT": acc["BWT"],
        "final_density": tasks[-1]["delta_density"],
        "mean_density": sum(t["delta_density"] for t in tasks) / len(tasks),
        "s_per_step": sum(t["train_seconds"] for t in tasks) / sum(t["steps"] for t in tasks),
        "peak_rss_mib": max(t["peak_rss_mib"] for t in tasks),
        "accuracy_matrix": acc["matrix"],
    }


def quality_table(rows: list[dict]) -> list[str]:
    """The per-variant markdown table, shared by this script's report and docs/benchmarks.md."""
    lines = [
        "| variant | OA % | BWT % | final delta density % | mean density % | s/step | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bwt = "-" if r["BWT"] is None else f"{100 * r['BWT']:+.1f}"
        lines.append(
            f"| {r['variant']} | {100 * r['OA']:.1f} | {bwt} | {100 * r['final_density']:.2f} | "
            f"{100 * r['mean_density']:.2f} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"# CL quality benchmark ({result['created']})",
        "",
        f"Model `{result['model']}`, order {result['order']}, {result['settings']}",
        "",
        *quality_table(result["rows"]),
    ]
    ratio = result.get("step_time_ratio_jump_over_plain")
    if ratio is not None:
        lines += [
            "",
            f"Step-time ratio incLoRA+jump / incLoRA: **{ratio:.2f}** (target <= 1.5 on CPU)",
        ]
    lines += ["", "Machine: " + machine_line(result["machine"]), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--order", default="short_order_1")
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 tasks, few rows")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cl_quality-") as tmp:
        work = Path(tmp)
        data = {
            "root": str(args.data),
            "order": args.order,
            "train_rows": args.train_rows,
            "eval_rows": args.eval_rows,
            "max_length": args.max_length,
        }
        model = args.model
        if args.quick:
            from jlserve.models.tiny import build_tiny_llama

            model = build_tiny_llama(work / "tiny")
            data = {
                "root": str(args.data),
                "tasks": ["cb", "copa"],
                "train_rows": 16,
                "eval_rows": 8,
                "max_length": 96,
            }
        elif not (model / "config.json").is_file():
            print(
                f"no model at {model}: run `jlserve model prepare smollm2 --out {model}`",
                file=sys.stderr,
            )
            return 2
        base_cfg = {
            "model": str(model),
            "data": data,
            "adapter": {"r": args.r, "alpha": 4 * args.r},
            "train": {
                "lr": args.lr,
                "batch_size": 4 if args.quick else args.batch_size,
                "epochs": 1,
            },
        }
        rows = [run_variant(name, base_cfg, work) for name in args.variants]

    by_name = {r["variant"]: r for r in rows}
    result = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": str(model if not args.quick else "tiny random Llama (quick)"),
        "order": args.order if not args.quick else "cb, copa (quick)",
        "settings": json.dumps({k: v for k, v in base_cfg.items() if k != "model"}),
        "machine": machine_info(),
        "rows": rows,
    }
    if "incLoRA" in by_name and "incLoRA+jump" in by_name:
        result["step_time_ratio_jump_over_plain"] = (
            by_name["incLoRA+jump"]["s_per_step"] / by_name["incLoRA"]["s_per_step"]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cl_quality_quick" if args.quick else "cl_quality"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
