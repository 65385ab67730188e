"""`jlserve update|status|rollback`: talk to a running `jlserve serve` over its admin API."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from jlserve.client import DEFAULT_URL, URL_ENV, AdminClient, resolve_token
from jlserve.server.schemas import UpdateResponse


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"server URL (default: ${URL_ENV} or {DEFAULT_URL})")
    common.add_argument(
        "--admin-token-file",
        type=Path,
        help="admin token file (default: $JLSERVE_ADMIN_TOKEN_FILE, else $JLSERVE_ADMIN_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="print the server's JSON answer")

    update = subparsers.add_parser(
        "update", parents=[common], help="apply a delta to a running server"
    )
    update.add_argument("--delta", type=Path, required=True, help="delta file (.safetensors)")
    update.set_defaults(func=_update)

    status = subparsers.add_parser("status", parents=[common], help="served version and history")
    status.set_defaults(func=_status)

    rollback = subparsers.add_parser("rollback", parents=[common], help="serve an earlier version")
    rollback.add_argument("--to", type=int, required=True, help="version to serve (0 = base)")
    rollback.set_defaults(func=_rollback)


def _client(args: argparse.Namespace) -> AdminClient:
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    return AdminClient(url, resolve_token(args.admin_token_file))


def _print_update(result: UpdateResponse, as_json: bool) -> int:
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        t = result.timings
        print(
            f"model version {result.previous_version} -> {result.version} ({result.fingerprint}); "
            f"swap {t.total_s:.3f} s (requests held {t.paused_s:.3f} s, apply {t.apply_s:.3f} s)"
        )
    return 0


def _update(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_update(client.update(args.delta), args.json)


def _rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_update(client.rollback(args.to), args.json)


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status.model_dump(mode="json"), indent=2))
        return 0
    print(f"version {status.version}  {status.fingerprint}")
    print(f"base    {status.base.path}  ({status.base.fingerprint})")
    print(f"swap policy {status.swap_policy}, apply path {status.apply_path}")
    for entry in status.chain:
        print(f"  v{entry.version}  {entry.task}  nnz={entry.nnz}  {entry.applied_at}")
    if status.last_update:
        print(f"last update: {status.last_update.timings.total_s:.3f} s")
    if status.degraded:
        print(f"DEGRADED: {status.degraded}")
    return 0
