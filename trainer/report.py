"""report.md and PNG plots of a run: accuracy heatmap, density per layer per task,
support-overlap matrix. Written after every task, so a partial run has a report too."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from trainer.adapter import block_index
from trainer.config import RunConfig


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:+.3f}"


def _heatmap(
    matrix: list[list[float | None]], rows: list[str], cols: list[str], title: str, path: Path
) -> None:
    data = [[float("nan") if v is None else v for v in row] for row in matrix]
    # At least 4.5 in wide (the colorbar and a wrapped title fit with 2 tasks), wider per task.
    width = max(4.5, 1.6 + 0.7 * len(cols))
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.6 * len(rows)), layout="constrained")
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if matrix[i][j] is not None:
                ax.text(
                    j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="w", fontsize=8
                )
    # Over the whole figure (an axes title is centred on the matrix and ran off the edges).
    fig.suptitle(textwrap.fill(title, width=int(width * 9)), fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _density_plot(density: dict[str, dict], path: Path) -> None:
    """Density of each task's delta per transformer block (adapted matrices pooled)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for task, d in density.items():
        per_layer: dict[int, list[float]] = {}
        for name, value in d["per_matrix"].items():
            index = block_index(name)
            per_layer.setdefault(-1 if index is None else index, []).append(value)
        layers = sorted(per_layer)
        ax.plot(
            layers,
            [100 * sum(per_layer[k]) / len(per_layer[k]) for k in layers],
            marker="o",
            label=task,
        )
    ax.set_xlabel("block")
    ax.set_ylabel("delta density (%)")
    ax.set_title("Density of each task's delta per block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_lines(metrics: dict[str, Any]) -> list[str]:
    """Each task's metric, and the held-out loss matrix with the rise of every earlier
    task's loss (forgetting measured in loss, for every kind of task)."""
    loss, tasks = metrics.get("loss"), metrics["accuracy"]["tasks"]
    if not loss:
        return []
    kinds = metrics.get("task_metrics", {})
    lines = [
        "",
        "Metric per task: "
        + ", ".join(
            f"{t} {'ROUGE-L F1' if kinds.get(t) == 'rougeL' else 'exact match'}" for t in tasks
        ),
        "",
        "## Held-out loss (mean per target token; rows as above)",
        "",
        "| after \\ on | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
        "| base | " + " | ".join("-" if v is None else f"{v:.3f}" for v in loss["base"]) + " |",
    ]
    for i, row in enumerate(loss["matrix"]):
        if row[i] is not None:
            lines.append(
                f"| {tasks[i]} | "
                + " | ".join("-" if v is None else f"{v:.3f}" for v in row)
                + " |"
            )
    if loss.get("forgetting"):
        rise = ", ".join(f"{t} {v:+.3f}" for t, v in loss["forgetting"].items())
        lines += ["", f"Loss rise of earlier tasks since their own (forgetting): {rise}; "
                  f"mean {loss['mean_forgetting']:+.3f}"]  # fmt: skip
    return lines


def write_report(run_dir: Path, metrics: dict[str, Any], cfg: RunConfig, command: str) -> None:
    acc = metrics["accuracy"]
    tasks = acc["tasks"]
    done = [t["task"] for t in metrics["tasks"]]
    rouge = {t for t, kind in metrics.get("task_metrics", {}).items() if kind == "rougeL"}
    _heatmap(
        [acc["base"], *acc["matrix"]],
        ["base", *tasks],
        [f"{t} (ROUGE-L)" if t in rouge else t for t in tasks],
        (
            "score on task j (exact match; ROUGE-L F1 where named)"
            if rouge
            else "exact match on task j"
        )
        + ": base model, then after task i",
        run_dir / "accuracy.png",
    )
    if metrics["density"]:
        _density_plot(metrics["density"], run_dir / "density.png")
    overlap = metrics["support_overlap"]
    if overlap["tasks"]:
        _heatmap(
            overlap["jaccard"],
            overlap["tasks"],
            overlap["tasks"],
            "Jaccard overlap of delta supports",
            run_dir / "overlap.png",
        )
    lines = [
        f"# Run report: {cfg.method.name} + gate {cfg.adapter.gate}",
        "",
        f"Command: `{command}`" if command else "",
        f"Model: `{cfg.model}`; tasks: {', '.join(tasks)}; completed {len(done)}/{len(tasks)}.",
        "",
        f"OA {_fmt(acc.get('OA'), pct=True)} "
        f"(prefix match {_fmt(acc.get('OA_prefix'), pct=True)}), "
        f"BWT {_fmt(acc.get('BWT'))}, FWT {_fmt(acc.get('FWT'))}; base model OA "
        f"{_fmt(acc.get('base_OA'), pct=True)}, gain over the base {_fmt(acc.get('gain_over_base'))}",
        "",
        "## Accuracy (exact match, %; rows: the base model, then after task i; the entry right",
        "of the diagonal is the next task before training on it, for FWT)",
        "",
        "| after \\ on | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
        "| base | " + " | ".join(_fmt(v, pct=True) for v in acc["base"]) + " |",
    ]
    for i, row in enumerate(acc["matrix"]):
        if row[i] is not None:
            lines.append(f"| {tasks[i]} | " + " | ".join(_fmt(v, pct=True) for v in row) + " |")
    lines += _loss_lines(metrics)
    lines += [
        "",
        "## Per task",
        "",
        "| task | steps | s/step | final loss | gate density | delta density | theta | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in metrics["tasks"]:
        lines.append(
            f"| {t['task']} | {t['steps']} | {t['seconds_per_step']:.3f} | {t['final_loss']:.3f} | "
            f"{100 * t['gate_density']:.2f} % | {100 * t['delta_density']:.2f} % | "
            f"{t['theta']:.2e} | {t['peak_rss_mib']:.0f} MiB |"
        )
    lines += [
        "",
        "![accuracy](accuracy.png)",
        "",
        "![density](density.png)",
        "",
        "![overlap](overlap.png)",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
