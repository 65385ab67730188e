"""`jlserve data ...`: get the benchmark and check a data root (docs/data.md).

    jlserve data cl-benchmark --source DIR [--out DIR]   lay out the 15 tasks from a checkout
    jlserve data check [ROOT]                            list every problem of a data root

Registered by the trainer (see trainer/cli.py), since the layout is the trainer's concern.
Exit codes: 0 all good; 1 the source lacks something or the root has problems (each on
its own line on stderr); 2 a usage error (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.config import default_data_root


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
    check = actions.add_parser("check", help="validate a data root: one line per problem")
    check.add_argument(
        "root", type=Path, nargs="?", default=None, help="default: data/cl_benchmark"
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

    root = args.root or default_data_root()
    problems = check_root(root)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{root}: {len(problems)} problem{'s' * (len(problems) > 1)}", file=sys.stderr)
        return 1
    specs, orders = read_index(root)
    print(f"{root}: ok, {len(specs)} tasks, orders: {', '.join(orders) or 'none'}")
    return 0
