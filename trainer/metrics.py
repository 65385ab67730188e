"""Continual-learning metrics as small objects with update / result / reset.

a[i][j] = exact-match accuracy on task j after training task i (i >= j).
OA  = mean_j a[T][j] over the tasks seen by the last completed task T.
BWT = 1/(T-1) sum_{j<T} (a[T][j] - a[j][j])        (negative: forgetting)
FWT = 1/T sum_j (a[j][j] - b[j]), b[j] the accuracy of a from-scratch single-task model
      on task j (given in the config as `fwt_baseline`); absent without it.
Density and support overlap are measured on the exported deltas: the coordinates a task
really changed in the checkpoint dtype.
"""

from __future__ import annotations

import torch

from jlserve.delta import SparseDelta


class AccuracyMatrix:
    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.reset()

    def reset(self) -> None:
        self.exact: list[list[float | None]] = [[None] * len(self.tasks) for _ in self.tasks]
        self.prefix: list[list[float | None]] = [[None] * len(self.tasks) for _ in self.tasks]

    def update(self, i: int, j: int, exact: float, prefix: float) -> None:
        self.exact[i][j] = exact
        self.prefix[i][j] = prefix

    def result(self, baseline: dict[str, float] | None = None) -> dict:
        done = [i for i, row in enumerate(self.exact) if row[i] is not None]
        out: dict = {"matrix": self.exact, "prefix_matrix": self.prefix, "tasks": self.tasks}
        if not done:
            return out
        last = done[-1]
        final = [self.exact[last][j] for j in range(last + 1)]
        out["OA"] = sum(final) / len(final)
        out["OA_prefix"] = sum(self.prefix[last][: last + 1]) / (last + 1)
        out["BWT"] = (
            sum(self.exact[last][j] - self.exact[j][j] for j in range(last)) / last
            if last
            else None
        )
        if baseline is not None and all(self.tasks[j] in baseline for j in range(last + 1)):
            gaps = [self.exact[j][j] - baseline[self.tasks[j]] for j in range(last + 1)]
            out["FWT"] = sum(gaps) / len(gaps)
        return out


class DeltaDensity:
    """Per-task and per-matrix density of the exported deltas over the adapted matrices."""

    def __init__(self, adapted: dict[str, int]) -> None:
        self.adapted = adapted  # HF parameter name -> number of entries
        self.reset()

    def reset(self) -> None:
        self.per_task: dict[str, dict] = {}

    def update(self, task: str, delta: SparseDelta) -> None:
        nnz = {
            name: (delta.changes[name].nnz if name in delta.changes else 0) for name in self.adapted
        }
        self.per_task[task] = {
            "density": sum(nnz.values()) / sum(self.adapted.values()),
            "nnz": sum(nnz.values()),
            "per_matrix": {name: nnz[name] / n for name, n in self.adapted.items()},
        }

    def result(self) -> dict[str, dict]:
        return self.per_task


class SupportOverlap:
    """Jaccard overlap of the changed-coordinate sets of every pair of task deltas."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tasks: list[str] = []
        self.supports: list[dict[str, torch.Tensor]] = []  # per task: name -> sorted flat index

    def update(self, task: str, delta: SparseDelta) -> None:
        self.tasks.append(task)
        self.supports.append({n: c.index.long() for n, c in delta.changes.items()})

    @staticmethod
    def _jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        inter = sum(int(torch.isin(a[n], b[n]).sum()) for n in a.keys() & b.keys())
        union = sum(t.numel() for t in a.values()) + sum(t.numel() for t in b.values()) - inter
        return inter / union if union else 0.0

    def result(self) -> dict:
        n = len(self.tasks)
        matrix = [
            [self._jaccard(self.supports[i], self.supports[j]) for j in range(n)] for i in range(n)
        ]
        return {"tasks": self.tasks, "jaccard": matrix}
