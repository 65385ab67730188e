"""Section 5, continued: what a 15-task variant's evaluation costs before and after issue 24's
point 2 (the whole accuracy matrix in process against the needed entries through vLLM), from
one whole variant each way at a small size (bench/forgetting_regime.sh's `lo4-small-*`
result sets)."""

from __future__ import annotations

from typing import Any

from bench.common import read_result

BEFORE = ("lo4-small-full-in_process", "before: the whole matrix, in process")
AFTER = ("lo4-small-needed-vllm", "after: the needed entries, through vLLM")


def evaluations(row: dict[str, Any]) -> int:
    """Task evaluations the variant made: its base row and the entries after each task."""
    return len(row["base_row"]) + sum(
        v is not None for line in row["accuracy_matrix"] for v in line
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def section(_docs: dict[str, dict[str, Any]]) -> list[str]:
    runs = []
    for tag, label in (BEFORE, AFTER):
        doc = read_result(f"cl_quality_{tag}", False)
        if doc is not None and doc["rows"]:
            runs.append((label, doc["rows"][0]))
    if not runs:
        return []
    first = runs[0][1]
    settings = first["settings"]
    out = [
        "### Evaluating a 15-task stream, before and after (issue 24, point 2)",
        "",
        f"One whole variant ({first['variant']}, order {settings['data']['order']}, "
        f"{settings['data']['train_rows']} train rows and "
        f"{settings['data']['eval_rows']} dev rows per task, "
        f"{', '.join(settings.get('overrides', [])) or 'default seed'}) each way, one "
        "after the other on the same machine; `whole s` is the variant's wall time (server "
        "start, base row, training, evaluations; what else it holds: docs/trainer.md, 'Evaluating "
        "a long stream'), `eval s` the evaluations after each task.",
        "",
        "| how | evaluations | eval s | train s | whole s | OA % | BWT | FWT | load average |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in runs:
        load = ", ".join(f"{x:.1f}" for x in row["load_average"])
        out.append(
            f"| {label} | {evaluations(row)} | {_seconds(row.get('eval_s'))} | "
            f"{row['train_s']:.0f} | {_seconds(row.get('wall_s'))} | {100 * row['OA']:.1f} | "
            f"{100 * row['BWT']:+.1f} | {100 * row['FWT']:+.1f} | {load} |"
        )
    if len(runs) == 2:
        before, after = runs[0][1], runs[1][1]
        ratios = [
            f"{name} {before[key] / after[key]:.1f}x shorter"
            for name, key in (("evaluation", "eval_s"), ("whole variant", "wall_s"))
            if before.get(key) and after.get(key)
        ]
        same = all(before[k] == after[k] for k in ("OA", "BWT", "FWT"))
        out += [
            "",
            f"- After against before: {', '.join(ratios)} (one run each way: a ratio, not a "
            "median over repeats; the load average is each run's at its end). OA, BWT and "
            f"FWT {'are identical' if same else 'differ (the two evaluators answer a few prompts differently)'}.",
        ]
    return [*out, ""]
