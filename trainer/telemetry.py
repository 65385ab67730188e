"""TensorBoard event files of a run (`tensorboard --logdir runs/`), written by rank 0.

Tags (step = the run's global optimizer step, counted over every task; task = its index):
    train/loss, train/lr, train/grad_norm, train/density     per logged step
    train/theta/<group>                                      per logged step, each threshold
                                                             group (global, or block<i>)
    train/<extra>                                            method and L0 terms (ella, l0...)
    task/<name>/accuracy                                     after each task, at that task index
    stream/OA, stream/BWT, stream/FWT, stream/delta_density  after each task
    accuracy_matrix                                          the matrix so far, as text
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EVENTS_DIR = "tensorboard"


class Telemetry:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard only when a run starts

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / EVENTS_DIR))

    def step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        density: float | None,
        thetas: dict[str, float],
        extras: dict[str, float],
    ) -> None:
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/grad_norm", grad_norm, step)
        if density is not None:
            w.add_scalar("train/density", density, step)
        for group, theta in thetas.items():
            w.add_scalar(f"train/theta/{group}", theta, step)
        for name, value in extras.items():
            w.add_scalar(f"train/{name}", value, step)

    def task_end(self, index: int, accuracy: dict[str, Any], density: float) -> None:
        """After task `index`: each task's latest entry, the stream metrics, the matrix."""
        w = self.writer
        matrix = accuracy["matrix"]
        for j, name in enumerate(accuracy["tasks"]):
            if matrix[index][j] is not None:
                w.add_scalar(f"task/{name}/accuracy", matrix[index][j], index)
        for key in ("OA", "BWT", "FWT"):
            if (
                accuracy.get(key) is not None
                and accuracy.get("OA_after") == accuracy["tasks"][index]
            ):
                w.add_scalar(f"stream/{key}", accuracy[key], index)
        w.add_scalar("stream/delta_density", density, index)
        w.add_text("accuracy_matrix", _markdown(accuracy), index)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def _markdown(accuracy: dict[str, Any]) -> str:
    tasks = accuracy["tasks"]
    rows = [f"| after | {' | '.join(tasks)} |", "|---" * (len(tasks) + 1) + "|"]
    labelled = [("base", accuracy["base"]), *zip(tasks, accuracy["matrix"], strict=True)]
    for label, row in labelled:
        cells = " | ".join("" if v is None else f"{v:.3f}" for v in row)
        rows.append(f"| {label} | {cells} |")
    return "\n".join(rows)
