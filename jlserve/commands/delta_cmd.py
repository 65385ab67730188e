"""`jlserve delta ...`: make, apply, revert and inspect sparse delta files offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from jlserve.commands import positive_int
from jlserve.vocab import DELTA_FORMAT_VERSION

if TYPE_CHECKING:
    from jlserve.delta.format import SparseDelta


def register(subparsers: argparse._SubParsersAction) -> None:
    delta = subparsers.add_parser("delta", help="make, apply, revert and inspect sparse deltas")
    actions = delta.add_subparsers(dest="delta_command", required=True, metavar="ACTION")

    diff = actions.add_parser("diff", help="write the sparse delta between two checkpoints")
    diff.add_argument("--base", type=Path, required=True, help="parent checkpoint directory")
    diff.add_argument("--target", type=Path, required=True, help="child checkpoint directory")
    diff.add_argument("--out", type=Path, required=True, help="delta file to write")
    diff.add_argument("--task", help="task name recorded in the delta (default: target dir name)")
    diff.add_argument(
        "--version",
        type=positive_int,
        help="advisory version label stored in the file (servers number versions themselves)",
    )
    diff.add_argument(
        "--format",
        choices=["v1", "v2"],
        default=f"v{DELTA_FORMAT_VERSION}",
        help="v2 (default): gap-encoded positions + XOR values, ~3 bytes/coordinate in bf16; "
        "v1: index + old + new values, 8 bytes/coordinate, for readers older than v2",
    )
    diff.add_argument(
        "--compression",
        choices=["zstd", "none"],
        default="zstd",
        help="v2 only: zstd each section where that makes it smaller (default), or never",
    )
    diff.set_defaults(func=_diff)

    apply = actions.add_parser("apply", help="apply deltas in order and write a new checkpoint")
    apply.add_argument("--model", type=Path, required=True, help="checkpoint to start from")
    apply.add_argument("--delta", type=Path, action="append", required=True, help="repeatable")
    apply.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    apply.set_defaults(func=_apply)

    revert = actions.add_parser("revert", help="undo deltas (last given is undone first)")
    revert.add_argument("--model", type=Path, required=True, help="checkpoint the deltas produced")
    revert.add_argument("--delta", type=Path, action="append", required=True, help="repeatable")
    revert.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    revert.set_defaults(func=_revert)

    inspect = actions.add_parser("inspect", help="print metadata, per-matrix nnz/density, size")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_inspect)


# Commands import torch-based modules when they run, so `jlserve update` stays light.


def _diff(args: argparse.Namespace) -> int:
    from jlserve.checkpoint import load_tensors
    from jlserve.delta import diff_tensors, write_delta

    base, target = load_tensors(args.base), load_tensors(args.target)
    task = args.task or args.target.resolve().name
    delta = diff_tensors(base, target, task=task, version=args.version)
    format_version = 1 if args.format == "v1" else 2
    size = write_delta(delta, args.out, format_version=format_version, compression=args.compression)
    print(
        f"wrote {args.out} (format {args.format}): {delta.nnz} changed coordinates in "
        f"{len(delta.changes)} tensors, {size} bytes"
    )
    return 0


def _apply(args: argparse.Namespace) -> int:
    return _transform(args, reverse=False)


def _revert(args: argparse.Namespace) -> int:
    return _transform(args, reverse=True)


def _transform(args: argparse.Namespace, *, reverse: bool) -> int:
    """Validate every delta (files, then lineage in order) before writing anything."""
    from jlserve.checkpoint import TensorDigests, load_tensors, write_checkpoint
    from jlserve.delta import plan_chain, read_delta

    chain = [(read_delta(path), str(path)) for path in args.delta]
    if reverse:
        chain.reverse()
    tensors = load_tensors(args.model)
    planned = plan_chain(tensors, TensorDigests(tensors), chain, reverse=reverse)
    write_checkpoint({**tensors, **planned.changed}, args.out, like=args.model)
    verb = "reverted" if reverse else "applied"
    print(f"{verb} {len(chain)} delta(s): wrote {args.out} ({planned.fingerprint})")
    return 0


def describe(delta: SparseDelta, file_size: int) -> dict:
    """Everything `inspect` reports, as one JSON-able dict (`delta` read from a file)."""
    from jlserve.delta import density_report

    per_param = density_report(delta)
    changed_numel = sum(p["numel"] for p in per_param.values())
    payload = delta.payload_bytes or 0
    meta = delta.metadata
    return {
        "metadata": meta.model_dump(exclude={"params", "encoding"}),
        "format": f"v{meta.format_version}",
        "encoding": (
            meta.encoding.model_dump()
            if meta.encoding is not None
            else {"positions": "int-index", "values": "old-and-new"}
        ),
        "params": per_param,
        "nnz": delta.nnz,
        "density_of_changed_tensors": delta.nnz / changed_numel if changed_numel else 0.0,
        "file_bytes": file_size,
        "payload_bytes": payload,
        "bytes_per_changed_coordinate": file_size / delta.nnz if delta.nnz else None,
        "payload_bytes_per_changed_coordinate": payload / delta.nnz if delta.nnz else None,
    }


def _encoding_line(info: dict) -> str:
    enc = info["encoding"]
    if info["format"] == "v1":
        return "index + old + new values (uncompressed)"
    return (
        f"positions {enc['positions']} ({enc['positions_codec']}, {enc['positions_bytes']} "
        f"bytes raw), values {enc['values']} ({enc['values_codec']}, {enc['values_bytes']} "
        "bytes raw)"
    )


def _inspect(args: argparse.Namespace) -> int:
    from jlserve.delta import read_delta

    delta = read_delta(args.file)
    info = describe(delta, args.file.stat().st_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    meta = info["metadata"]
    print(f"{args.file}: {meta['format']} format {info['format']}")
    print(f"  encoding: {_encoding_line(info)}")
    label = f", labelled version {meta['version']}" if meta["version"] is not None else ""
    print(f"  task {meta['task']!r}{label}")
    print(f"  parent {meta['parent_fingerprint']}")
    print(f"  child  {meta['child_fingerprint']}")
    for name, p in info["params"].items():
        print(f"  {name}: {p['nnz']} / {p['numel']} ({100 * p['density']:.3f} %)")
    print(
        f"  total: {info['nnz']} changed coordinates in {len(info['params'])} tensors, "
        f"{info['file_bytes']} bytes in the file, {info['payload_bytes']} of them tensor data"
    )
    if delta.nnz:
        print(
            f"  bytes per changed coordinate: {info['bytes_per_changed_coordinate']:.2f} "
            f"(file), {info['payload_bytes_per_changed_coordinate']:.2f} (tensor data)"
        )
    return 0
