"""The data root on disk (docs/data.md): reading it for training, and checking all of it.

    <root>/tasks.json        {"tasks": {name: {"instruction", "options", ...}},
                              "orders": {order: [name, ...]}}
    <root>/<task>/train.json lists of {"sentence": str, "label": str}
    <root>/<task>/dev.json   (evaluation split)
    <root>/<task>/labels.json  optional; when present, the same list as the task's options

Training reads only the tasks of its stream and stops at the first problem; `check_root`
(`jlserve data check ROOT`) reads everything and lists every problem, one line each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError

SPLITS = ("train", "dev")
INDEX = "tasks.json"
LABELS = "labels.json"
MAX_EXAMPLES = 3  # offending labels or rows quoted in one problem line


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise TrainerError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise TrainerError(f"{path}: not valid JSON ({exc})") from None


def read_rows(path: Path) -> list[dict[str, str]]:
    """A split file: a non-empty list of {"sentence": str, "label": str}."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise TrainerError(f"{path}: expected a list of {{'sentence': str, 'label': str}}")
    bad = [i for i, r in enumerate(rows) if not _is_row(r)]
    if bad:
        raise TrainerError(
            f"{path}: row {bad[0]} is not {{'sentence': str, 'label': str}}"
            + (f" ({len(bad)} such rows)" if len(bad) > 1 else "")
        )
    if not rows:
        raise TrainerError(f"{path}: no rows (an empty task)")
    return rows


def read_examples(path: Path) -> list[dict[str, Any]]:
    """A run's copy of a task file's examples (trainer/append.py): a non-empty JSON list of
    the objects `trainer.jsonl` validated."""
    rows = read_json(path)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise TrainerError(f"{path}: expected a non-empty list of examples")
    return rows


def _is_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("sentence"), str)
        and isinstance(row.get("label"), str)
    )


def read_index(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tasks, orders) of `<root>/tasks.json`, checked for its top-level shape only."""
    path = root / INDEX
    index = read_json(path)
    specs = index.get("tasks") if isinstance(index, dict) else None
    orders = index.get("orders", {}) if isinstance(index, dict) else None
    if not isinstance(specs, dict) or not isinstance(orders, dict):
        raise TrainerError(
            f"{path}: expected {{'tasks': {{name: ...}}, 'orders': {{name: [...]}}}}"
        )
    return specs, orders


def spec_problem(name: str, spec: Any) -> str | None:
    """What is wrong with one task's entry in tasks.json, or None."""
    if not isinstance(spec, dict):
        return f"task {name!r}: must be a mapping with 'instruction' and 'options'"
    if not isinstance(spec.get("instruction", ""), str):
        return f"task {name!r}: 'instruction' must be a string"
    if spec.get("format", "benchmark") != "benchmark":  # a task file copied into a run
        if spec.get("format") not in ("chat", "completion"):
            return f"task {name!r}: 'format' must be benchmark, chat or completion"
        if spec.get("metric") not in ("exact", "rougeL"):
            return f"task {name!r}: 'metric' must be exact or rougeL"
        return None
    options = spec.get("options")
    if (
        not isinstance(options, list)
        or not options
        or not all(isinstance(o, str) and o.strip() for o in options)
    ):
        return f"task {name!r}: 'options' must be a non-empty list of label strings"
    if len(set(options)) != len(options):
        return f"task {name!r}: 'options' lists a label twice"
    return None


def order_problem(order: str, names: Any, specs: dict[str, Any]) -> str | None:
    """What is wrong with one order of tasks.json, or None."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"order {order!r}: must be a list of task names"
    if not names:
        return f"order {order!r}: has no tasks"
    unknown = [n for n in names if n not in specs]
    if unknown:
        return f"order {order!r}: names tasks that tasks.json does not define: {unknown}"
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        return f"order {order!r}: lists a task twice: {twice}"
    return None


def _quote(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:MAX_EXAMPLES])
    return shown + (f" and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else "")


def split_problem(path: Path, options: list[str]) -> str | None:
    """What is wrong with one split file of a task, or None."""
    if not path.is_file():
        return f"{path}: missing (every task needs {' and '.join(s + '.json' for s in SPLITS)})"
    try:
        rows = read_rows(path)
    except TrainerError as exc:
        return str(exc)
    unknown = sorted({r["label"] for r in rows} - set(options))
    if unknown:
        n = sum(r["label"] in unknown for r in rows)
        return (
            f"{path}: {n} rows have a label that is not among the task's options: {_quote(unknown)}"
        )
    return None


def labels_problem(path: Path, options: list[str]) -> str | None:
    """labels.json is optional; when present it must be the task's options."""
    if not path.exists():
        return None
    try:
        labels = read_json(path)
    except TrainerError as exc:
        return str(exc)
    if labels != options:
        return f"{path}: {labels!r} differs from the task's options in tasks.json {options!r}"
    return None


def check_root(root: Path) -> list[str]:
    """Every problem of a data root, one line each; empty when the root is usable."""
    if not root.is_dir():
        return [
            f"{root}: not a directory (for the CL benchmark: jlserve data cl-benchmark "
            f"--source DIR --out {root}; docs/data.md)"
        ]
    try:
        specs, orders = read_index(root)
    except TrainerError as exc:
        return [str(exc)]
    problems = [] if specs else [f"{root / INDEX}: defines no tasks"]
    for name, spec in specs.items():
        problem = spec_problem(name, spec)
        if problem is not None:
            problems.append(problem)
            continue
        for split in SPLITS:
            problems.append(split_problem(root / name / f"{split}.json", spec["options"]))
        problems.append(labels_problem(root / name / LABELS, spec["options"]))
    problems += [order_problem(order, names, specs) for order, names in orders.items()]
    return [p for p in problems if p is not None]
