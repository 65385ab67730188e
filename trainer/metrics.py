"""Continual-learning metrics as small objects with update / result / reset.

a[i][j] = exact-match accuracy on task j after training task i (version i + 1); the loop
fills j <= i + 1 (the tasks seen so far and the next one, for FWT), or under
train.eval_schedule "needed" only what the metrics below read: the diagonal, the next
task, and the whole last row of the run (an empty entry is None).
b[j]    = accuracy of the base model (version 0) on task j: the base row.
OA   = mean_j a[T][j] over the tasks seen by the last completed task T.
BWT  = 1/(T-1) sum_{j<T} (a[T][j] - a[j][j])                      (negative: forgetting)
FWT  = 1/(T-1) sum_{j>=1} (a[j-1][j] - b[j])   what earlier tasks did for a task not yet
       trained on, against the base model (GEM's definition, b = the base row)
gain = OA - mean_j b[j] over the same tasks: what the stream added over the base model.
Density and support overlap are measured on the exported deltas: the coordinates a task
really changed in the checkpoint dtype.
"""

from __future__ import annotations

import statistics

import torch

from jlserve.delta import SparseDelta
from trainer.adapter import block_index


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class AccuracyMatrix:
    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.reset()

    def reset(self) -> None:
        n = len(self.tasks)
        self.exact: list[list[float | None]] = [[None] * n for _ in self.tasks]
        self.prefix: list[list[float | None]] = [[None] * n for _ in self.tasks]
        self.base: list[float | None] = [None] * n
        self.base_prefix: list[float | None] = [None] * n

    def restore(self, saved: dict[str, list]) -> None:
        """The entries of a saved matrix (run.json "accuracy"), on a stream that may have
        grown since: the new tasks' rows and columns stay empty."""
        n = len(self.tasks)

        def padded(row: list) -> list:
            return [*row, *[None] * (n - len(row))]

        self.exact = [padded(r) for r in saved["exact"]] + self.exact[len(saved["exact"]) :]
        self.prefix = [padded(r) for r in saved["prefix"]] + self.prefix[len(saved["prefix"]) :]
        self.base, self.base_prefix = padded(saved["base"]), padded(saved["base_prefix"])

    def update(self, i: int, j: int, exact: float, prefix: float) -> None:
        """Row i (after task i); i = -1 is the base row (version 0)."""
        if i < 0:
            self.base[j], self.base_prefix[j] = exact, prefix
        else:
            self.exact[i][j], self.prefix[i][j] = exact, prefix

    def result(self) -> dict:
        done = [i for i, row in enumerate(self.exact) if row[i] is not None]
        out: dict = {
            "matrix": self.exact,
            "prefix_matrix": self.prefix,
            "base": self.base,
            "base_prefix": self.base_prefix,
            "tasks": self.tasks,
        }
        # OA and BWT read one whole row: the last one evaluated on every task seen by then
        # (under train.eval_schedule "needed" only the final row of a run is whole).
        whole = [i for i in done if all(v is not None for v in self.exact[i][: i + 1])]
        if not whole:
            return out
        last = whole[-1]
        out["OA_after"] = self.tasks[last]
        out["OA"] = _mean(self.exact[last][: last + 1])
        out["OA_prefix"] = _mean(self.prefix[last][: last + 1])
        out["BWT"] = (
            _mean([self.exact[last][j] - self.exact[j][j] for j in range(last)]) if last else None
        )
        base = self.base[: last + 1]
        if all(b is not None for b in base):
            out["base_OA"] = _mean(base)
            out["gain_over_base"] = out["OA"] - out["base_OA"]
            pairs = [(self.exact[j - 1][j], base[j]) for j in range(1, last + 1)]
            if pairs and all(a is not None for a, _ in pairs):
                out["FWT"] = _mean([a - b for a, b in pairs])
        return out


class LossMatrix:
    """Held-out mean loss l[i][j] of task j after task i (None: not evaluated), b[j] on the
    base model. Forgetting in loss: how much each earlier task's loss rose from right
    after its own task to the last whole row (positive: forgotten)."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.reset()

    def reset(self) -> None:
        self.matrix: list[list[float | None]] = [[None] * len(self.tasks) for _ in self.tasks]
        self.base: list[float | None] = [None] * len(self.tasks)

    def restore(self, saved: dict[str, list] | None) -> None:
        """Saved entries (run.json "loss") on a stream that may have grown since."""
        if not saved:
            return
        n = len(self.tasks)
        rows = [[*r, *[None] * (n - len(r))] for r in saved["matrix"]]
        self.matrix = rows + self.matrix[len(rows) :]
        self.base = [*saved["base"], *[None] * (n - len(saved["base"]))]

    def update(self, i: int, j: int, loss: float) -> None:
        if i < 0:
            self.base[j] = loss
        else:
            self.matrix[i][j] = loss

    def result(self) -> dict:
        out: dict = {"matrix": self.matrix, "base": self.base, "tasks": self.tasks}
        whole = [i for i, row in enumerate(self.matrix) if all(v is not None for v in row[: i + 1])]
        if whole and whole[-1] > 0:
            last = whole[-1]
            rise = {
                self.tasks[j]: self.matrix[last][j] - self.matrix[j][j]
                for j in range(last)
                if self.matrix[j][j] is not None
            }
            out["forgetting"] = rise
            out["mean_forgetting"] = _mean(list(rise.values())) if rise else None
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

    def summary(self) -> dict[str, dict[str, float]]:
        """min / median / max of the per-task densities and of the per-block densities
        (blocks = transformer layers, over every task), the spread the learned gate makes."""
        per_task = [d["density"] for d in self.per_task.values()]
        per_block: list[float] = []
        for d in self.per_task.values():
            kept: dict[str, float] = {}
            numel: dict[str, int] = {}
            for name, density in d["per_matrix"].items():
                index = block_index(name)
                block = name if index is None else str(index)
                kept[block] = kept.get(block, 0.0) + density * self.adapted[name]
                numel[block] = numel.get(block, 0) + self.adapted[name]
            per_block += [kept[b] / numel[b] for b in kept]
        return {
            key: {"min": min(v), "median": statistics.median(v), "max": max(v)}
            for key, v in (("task", per_task), ("block", per_block))
            if v
        }


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many entries two strictly increasing index lists share: each of a's looked up in
    b by binary search (3x faster than torch.isin on millions of indices)."""
    if not a.numel() or not b.numel():
        return 0
    at = torch.searchsorted(b, a).clamp_(max=b.numel() - 1)
    return int((b[at] == a).sum())


class SupportOverlap:
    """Jaccard overlap of the changed-coordinate sets of every pair of task deltas. A task's
    row is computed once, when its delta arrives: the metrics are written after every task,
    and recomputing all T^2 pairs each time cost a 15-task stream of dense deltas (millions
    of indices each) more than its training."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tasks: list[str] = []
        self.supports: list[dict[str, torch.Tensor]] = []  # per task: name -> sorted flat index
        self.jaccard: list[list[float]] = []  # (T, T), symmetric

    def update(self, task: str, delta: SparseDelta) -> None:
        support = {n: c.index.long() for n, c in delta.changes.items()}
        row = [self._jaccard(support, earlier) for earlier in self.supports]
        for earlier_row, value in zip(self.jaccard, row, strict=True):
            earlier_row.append(value)
        # a delta's indices are strictly increasing: its support is itself whole, or empty
        row.append(1.0 if any(t.numel() for t in support.values()) else 0.0)
        self.tasks.append(task)
        self.supports.append(support)
        self.jaccard.append(row)

    @staticmethod
    def _jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        inter = sum(_common(a[n], b[n]) for n in a.keys() & b.keys())
        union = sum(t.numel() for t in a.values()) + sum(t.numel() for t in b.values()) - inter
        return inter / union if union else 0.0

    def result(self) -> dict:
        return {"tasks": list(self.tasks), "jaccard": [list(row) for row in self.jaccard]}
