"""Tasks arrive: append tasks to a run (`jlserve train --out RUN --add-task NAME=PATH`).

A run's stream is the tasks of its config (`data.order` / `data.tasks`, loaded from
`data.root`; empty for a run started by `--add-task`) followed by its appended tasks,
whose rows are copied into the run at append time:

    RUN/tasks/tasks.json         the appended tasks' specs (order "appended")
    RUN/tasks/<name>/{train,dev}.json  the rows the task trains and is evaluated on

so a run never depends on where a task's file came from, and every later evaluation reads
the same rows. run.json lists the appended tasks (name, source, per-task settings).

The append itself is one atomic rewrite of run.json (the loop's commit point) after the
rows are in place: interrupted before it, the run is exactly as it was; after it, the
new tasks are simply the run's unfinished tasks, which the loop trains (and `--resume`
finishes if that is interrupted). Nothing that fixes the chain may change (the model, the
method, the adapter, the gate...): only PER_TASK_KEYS, recorded per task.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jlserve.checkpoint import atomic_write_bytes
from jlserve.errors import JlserveError
from jlserve.taskfile import TaskFileError, as_row, read_task_file
from trainer.config import DataConfig, RunConfig
from trainer.data import Task, load_stream
from trainer.errors import TrainerError
from trainer.freeform import choose_metric
from trainer.jsonl import split_task, token_counter
from trainer.layout import INDEX, read_index, read_json

TASKS_DIR = "tasks"
APPENDED_ORDER = "appended"
# Settings a task may have of its own: they change how that task trains, not the chain.
PER_TASK_KEYS = (
    "train.lr",
    "train.epochs",
    "train.batch_size",
    "data.train_rows",
    "data.eval_rows",
    "train.seed",  # the task's data order, held-out share and initialization (a job's seed)
)


@dataclass(frozen=True)
class AddedTask:
    """`--add-task NAME=PATH[:VALIDATION]`: PATH is a task folder of a root in the CL layout
    (`<root>/<task>/{train,dev}.json`, its spec in `<root>/tasks.json` under the folder's
    name), or a JSONL task file (chat or prompt/completion, trainer/jsonl.py), optionally
    with a validation file held out instead of a share of the file."""

    name: str
    path: Path
    validation: Path | None = None

    @classmethod
    def parse(cls, text: str) -> AddedTask:
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise TrainerError(f"--add-task expects NAME=PATH[:VALIDATION], got {text!r}")
        path, validation = path.strip(), None
        head, colon, tail = path.rpartition(":")
        if colon and Path(head).is_file():
            path, validation = head, Path(tail)
        name = name.strip()
        if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise TrainerError(
                f"--add-task {name!r}: a task name may hold letters, digits, '-', '_' and '.'"
            )
        return cls(name, Path(path), validation)


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def task_settings(run_cfg: RunConfig, asked: RunConfig) -> dict[str, Any]:
    """The per-task settings `asked` gives the new tasks (those differing from the run's);
    refuses, naming the key, any other difference."""
    ours, theirs = flat(run_cfg.model_dump(mode="json")), flat(asked.model_dump(mode="json"))
    settings = {}
    for key in sorted(ours.keys() | theirs.keys()):
        if ours.get(key) == theirs.get(key) or key in ("data.order", "data.tasks", "data.root"):
            continue
        if key not in PER_TASK_KEYS:
            raise TrainerError(
                f"{key}: the run has {ours.get(key)!r}; an appended task cannot change it (it "
                f"would make the version chain inconsistent). Per-task settings: "
                f"{', '.join(PER_TASK_KEYS)}"
            )
        settings[key] = theirs[key]
    return settings


def for_task(cfg: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """The run's config with one task's own settings applied."""
    if not settings:
        return cfg
    raw = cfg.model_dump(mode="json")
    for key, value in settings.items():
        section, leaf = key.split(".")
        raw[section][leaf] = value
    return RunConfig.model_validate(raw)


def open_stream_config(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """A new run started by --add-task: its stream is only the added tasks. Returns the
    config without data.order/data.tasks and a note if the user had set them."""
    fields = cfg.data.model_fields_set & {"order", "tasks"}
    note = None
    if fields:
        keys = " and ".join(f"data.{f}" for f in sorted(fields))
        note = f"{keys} of the config is not used: the stream is the tasks given by --add-task"
    data = cfg.data.model_copy(update={"order": None, "tasks": None})
    return cfg.model_copy(update={"data": data}), note


def _source_task(added: AddedTask, cfg: RunConfig, settings: dict[str, Any]) -> Task:
    """The task at `added.path` with its row caps applied (the same seeded subset a fixed
    stream would draw for a task of that name)."""
    folder = added.path
    task_cfg = for_task(cfg, settings)
    if folder.is_file():
        return _file_task(added, task_cfg)
    if added.validation is not None:
        raise TrainerError(f"--add-task {added.name}: a validation file goes with a task file")
    if not (folder / "train.json").is_file():
        raise TrainerError(
            f"--add-task {added.name}: {folder} is neither a JSONL task file nor a task folder "
            "(no train.json there; docs/data.md)"
        )
    root = folder.resolve().parent
    specs, _ = read_index(root)
    if folder.resolve().name not in specs:
        raise TrainerError(f"--add-task {added.name}: no task {folder.name!r} in {root / INDEX}")
    data = DataConfig(
        root=root,
        tasks=[folder.resolve().name],
        train_rows=task_cfg.data.train_rows,
        eval_rows=task_cfg.data.eval_rows,
        max_length=cfg.data.max_length,
        prompt_format=cfg.data.prompt_format,
    )
    (task,) = load_stream(data, task_cfg.train.seed, rename={folder.resolve().name: added.name})
    return task


def _file_task(added: AddedTask, cfg: RunConfig) -> Task:
    """A JSONL task file, checked line by line (examples over data.max_length tokens
    dropped), with its held-out rows: the validation file, or a seeded share of the file."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainerError(f"model: {cfg.model}: cannot load the tokenizer ({first})") from None
    count = {"count_tokens": token_counter(tokenizer), "max_length": cfg.data.max_length}
    where = f"--add-task {added.name}"
    try:
        task_file = read_task_file(added.path, **count)
        validation = read_task_file(added.validation, **count) if added.validation else None
        train, held_out = split_task(task_file, seed=cfg.train.seed, validation=validation)
    except TaskFileError:
        raise  # names its file and lines already (a jobs worker reports which file)
    except JlserveError as exc:
        raise TrainerError(f"{where}: {exc}") from None
    train_rows, dev_rows = [as_row(e) for e in train], [as_row(e) for e in held_out]
    return Task(
        name=added.name,
        instruction="",
        options=[],
        train=train_rows,
        dev=dev_rows,
        format=task_file.format,
        metric=choose_metric(train_rows + dev_rows),
    )


def _write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


def read_added(
    run_dir: Path, cfg: RunConfig, info: dict[str, Any], added: list[AddedTask],
    settings: dict[str, Any],
) -> list[Task]:  # fmt: skip
    """The added tasks, validated against the run (`info`: its run.json, or None for a new
    run) and read with their row caps; nothing is written."""
    known = set(info["tasks"]) if info else set()
    names = [a.name for a in added]
    for name in names:
        if name in known:
            raise TrainerError(f"--add-task {name}: the run already has a task {name!r}")
        if names.count(name) > 1:
            raise TrainerError(f"--add-task {name}: given twice")
    if info and info["completed"] < len(info["tasks"]):
        raise TrainerError(
            f"{run_dir}: {len(info['tasks']) - info['completed']} task(s) not finished yet; "
            "finish them with --resume before adding more"
        )
    return [_source_task(a, cfg, settings) for a in added]


def write_added(run_dir: Path, appended: list[dict[str, Any]], tasks: list[Task]) -> None:
    """Copy the added tasks' rows into RUN/tasks (each folder renamed into place) and
    rewrite its index for `appended` (every appended task of the run, new ones last).
    run.json, written next by the caller, is what makes them part of the run."""
    root = run_dir / TASKS_DIR
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX
    specs = read_json(index_path)["tasks"] if index_path.is_file() else {}
    for task in tasks:
        staging = Path(tempfile.mkdtemp(prefix=f".{task.name}-", dir=root))
        _write_json(staging / "train.json", task.train)
        _write_json(staging / "dev.json", task.dev)
        final = root / task.name
        if final.exists():  # left by an append that never reached its commit point
            shutil.rmtree(final)
        os.replace(staging, final)
        specs[task.name] = (
            {"instruction": task.instruction, "options": task.options}
            if task.format == "benchmark"
            else {"format": task.format, "metric": task.metric}
        )
    order = [a["name"] for a in appended]
    _write_json(index_path, {"tasks": specs, "orders": {APPENDED_ORDER: order}})


def appended_tasks(run_dir: Path, cfg: RunConfig, appended: list[dict[str, Any]]) -> list[Task]:
    """The run's appended tasks, from its own copy of their rows."""
    names = [a["name"] for a in appended]
    if not names:
        return []
    data = DataConfig(
        root=run_dir / TASKS_DIR,
        tasks=names,
        max_length=cfg.data.max_length,
        prompt_format=cfg.data.prompt_format,
    )
    return load_stream(data, cfg.train.seed)


def withdraw_unfinished(run_dir: Path) -> list[str]:
    """Take the appended tasks a run has not finished back out of it, as if never added:
    a jobs worker does this after a job that stopped (cancelled, refused, failed), so the
    next job continues from the run's last version rather than retraining the stopped one.
    One atomic rewrite of run.json (matrices cut to the finished tasks), then the rows'
    folders go. Returns the names taken out."""
    path = run_dir / "run.json"
    if not path.is_file():
        return []
    info = read_json(path)
    done = info["completed"]
    dropped = info["tasks"][done:]
    appended_names = {a["name"] for a in info["appended"]}
    if not dropped:
        return []
    if not set(dropped) <= appended_names:
        raise TrainerError(
            f"{run_dir}: unfinished tasks {dropped} are not all appended ones; finish the "
            "run with --resume"
        )

    def cut(matrix: list[list]) -> list[list]:
        return [row[:done] for row in matrix[:done]]

    info["tasks"] = info["tasks"][:done]
    info["appended"] = [a for a in info["appended"] if a["name"] not in dropped]
    accuracy = info["accuracy"]
    for key in ("exact", "prefix"):
        accuracy[key] = cut(accuracy[key])
    for key in ("base", "base_prefix"):
        accuracy[key] = accuracy[key][:done]
    if info.get("loss"):
        info["loss"] = {"matrix": cut(info["loss"]["matrix"]), "base": info["loss"]["base"][:done]}
    atomic_write_bytes(path, json.dumps(info, indent=2).encode())
    for name in dropped:
        shutil.rmtree(run_dir / TASKS_DIR / name, ignore_errors=True)
    return dropped
