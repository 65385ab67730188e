"""`jlserve data ...`: get the benchmark and check a data root (docs/data.md).

    jlserve data cl-benchmark --source DIR [--out DIR]   lay out the 15 tasks from a checkout
    jlserve data check [ROOT]                            list every problem of a data root
    jlserve data check FILE [--model DIR] [--max-length N]   the same for a JSONL task file

Registered by the trainer (see trainer/cli.py), since the layout is the trainer's concern.
Exit codes: 0 all good; 1 the source lacks something, or the root or file has problems
(each on its own line on stderr); 2 a usage error, or a model that cannot count tokens
(one line).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from trainer.config import DataConfig, default_data_root
from trainer.errors import TrainerError

MAX_LENGTH = DataConfig.model_fields["max_length"].default  # data.max_length's default


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="get the CL benchmark, check a data root")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    bench = actions.add_parser(
        "cl-benchmark",
        help="lay out the Standard CL and Long Sequence benchmarks from a checkout of "
        "alexandra-dragomir/JumpLoRA (CL_Benchmark_dev) or cmnfriend/O-LoRA (CL_Benchmark)",
    )
    bench.add_argument(
        "--source",
        type=Path,
        required=True,
        help="a checkout of the JumpLoRA or O-LoRA repository, or its benchmark folder",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (must not exist; default: data/cl_benchmark of this checkout, "
        "where the configs look)",
    )
    bench.set_defaults(func=_cl_benchmark)
    check = actions.add_parser(
        "check", help="validate a data root or a JSONL task file: one line per problem"
    )
    check.add_argument(
        "path",
        type=Path,
        nargs="?",
        default=None,
        metavar="PATH",
        help="a data root directory (default: data/cl_benchmark) or a JSONL task file",
    )
    check.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="JSONL file: count tokens with this model's tokenizer (chat template for chat "
        "files) and report the examples over --max-length (without it, lengths are not checked)",
    )
    check.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help=f"JSONL file with --model: the token limit per example (default {MAX_LENGTH}, "
        "as data.max_length)",
    )
    check.set_defaults(func=_check)


def _cl_benchmark(args: argparse.Namespace) -> int:
    from trainer.cl_benchmark import build

    report = build(args.source, args.out or default_data_root())
    for task, splits in report.written.items():
        counts = ", ".join(f"{split} {n}" for split, n in splits.items())
        print(f"{task}: {counts}")
    orders = ", ".join(report.orders) or "none"
    print(f"wrote {len(report.written)} tasks to {report.out} (checked); orders: {orders}")
    for line in report.notes:
        print(f"note: {line}")
    for line in report.missing:
        print(f"left out: {line}", file=sys.stderr)
    if not report.complete:
        print(
            f"{len(report.missing)} of {len(report.missing) + len(report.written)} tasks left "
            "out, with every order that needs them: complete the source and run again",
            file=sys.stderr,
        )
    return 0 if report.complete else 1


def _check(args: argparse.Namespace) -> int:
    from trainer.layout import check_root, read_index

    root = args.path or default_data_root()
    if root.is_file():
        return _check_task_file(root, args.model, args.max_length)
    if args.path is not None and not root.exists():
        print(f"{root}: no such data root directory or JSONL task file", file=sys.stderr)
        return 1
    if args.model is not None or args.max_length is not None:
        raise TrainerError(f"{root}: --model and --max-length are for a JSONL task file")
    problems = check_root(root)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{root}: {len(problems)} problem{'s' * (len(problems) > 1)}", file=sys.stderr)
        return 1
    specs, orders = read_index(root)
    print(f"{root}: ok, {len(specs)} tasks, orders: {', '.join(orders) or 'none'}")
    return 0


def _tokenizer(model: Path) -> Any:
    """The model directory's tokenizer, read locally (the hub is never asked)."""
    from transformers import AutoTokenizer

    if not model.is_dir():
        raise TrainerError(f"--model {model}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainerError(f"--model {model}: cannot load the tokenizer ({exc})") from None


def _check_task_file(path: Path, model: Path | None, max_length: int | None) -> int:
    """Problems on stderr (exit 1); or the format, counts, length notes and split (exit 0)."""
    from jlserve.taskfile import (
        ROLES,
        ChatExample,
        TaskFileError,
        TaskSplitError,
        held_out_size,
        read_task_file,
    )
    from trainer.jsonl import token_counter

    limit = MAX_LENGTH if max_length is None else max_length
    if limit < 1:
        raise TrainerError(f"--max-length must be >= 1, got {limit}")
    counter = None if model is None else token_counter(_tokenizer(model))
    try:
        task = read_task_file(
            path, count_tokens=counter, max_length=None if counter is None else limit
        )
    except TaskFileError as exc:
        for line in exc.report:
            print(line, file=sys.stderr)
        print(f"{path}: {exc.count} problem{'s' * (exc.count > 1)}", file=sys.stderr)
        return 1
    n = len(task.examples)
    chats = [e for e in task.examples if isinstance(e, ChatExample)]
    roles = Counter(m.role for e in chats for m in e.messages)
    if chats:
        unweighted = sum(m.role == "assistant" and not m.learned for e in chats for m in e.messages)
        turns = ", ".join(f"{role} {roles[role]}" for role in ROLES)
        weight = f" ({unweighted} of weight 0)" if unweighted else ""
        print(f"{path}: {task.format} format, {n} examples; turns: {turns}{weight}")
    if counter is None:
        print(f"{path}: lengths not checked (give --model DIR to count tokens)")
    for line in task.notes:
        print(f"{path}: {line}")
    counts = f"{n} examples" + (f" ({roles['assistant']} assistant turns)" if chats else "")
    try:
        split = f"{held_out_size(n)} would be held out"
    except TaskSplitError as exc:
        split = f"none held out: {exc}"
    print(f"{path}: ok, {task.format} format, {counts}, {split}")
    return 0
