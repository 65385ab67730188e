"""`jlserve update|status|rollback`: talk to a running `jlserve serve` over its admin API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from jlserve.client import DEFAULT_URL, URL_ENV, AdminClient, resolve_token, update_fleet
from jlserve.errors import AdminRequestError
from jlserve.server.schemas import UpdateResponse


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        action="append",
        help=f"server URL (default: ${URL_ENV} or {DEFAULT_URL}); update takes it repeatedly",
    )
    common.add_argument(
        "--admin-token-file",
        type=Path,
        help="admin token file (default: $JLSERVE_ADMIN_TOKEN_FILE, else $JLSERVE_ADMIN_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="print the server's JSON answer")

    update = subparsers.add_parser(
        "update",
        parents=[common],
        help="apply a delta to a running server (or to several replicas, one after another)",
    )
    update.add_argument("--delta", type=Path, required=True, help="delta file (.safetensors)")
    update.add_argument(
        "--urls-file",
        type=Path,
        help="file with one replica URL per line (with or instead of --url)",
    )
    update.add_argument(
        "--no-rollback-on-failure",
        action="store_true",
        help="with several replicas: leave the updated ones at the new version if one fails",
    )
    update.set_defaults(func=_update)

    status = subparsers.add_parser("status", parents=[common], help="served version and history")
    status.set_defaults(func=_status)

    rollback = subparsers.add_parser("rollback", parents=[common], help="serve an earlier version")
    rollback.add_argument("--to", type=int, required=True, help="version to serve (0 = base)")
    rollback.set_defaults(func=_rollback)


def _urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.url or [])
    urls_file = getattr(args, "urls_file", None)
    if urls_file is not None:
        try:
            lines = urls_file.read_text().splitlines()
        except OSError as exc:
            raise AdminRequestError(f"{urls_file}: cannot read URL list ({exc.strerror})") from None
        urls += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return urls or [os.environ.get(URL_ENV) or DEFAULT_URL]


def _client(args: argparse.Namespace) -> AdminClient:
    urls = _urls(args)
    if len(urls) > 1:
        raise AdminRequestError(f"{args.command} takes one --url, got {len(urls)}")
    return AdminClient(urls[0], resolve_token(args.admin_token_file))


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
    urls = _urls(args)
    if len(urls) == 1:
        with _client(args) as client:
            return _print_update(client.update(args.delta), args.json)
    outcomes = update_fleet(
        urls,
        resolve_token(args.admin_token_file),
        args.delta,
        rollback_on_failure=not args.no_rollback_on_failure,
    )
    if args.json:
        print(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=2, default=str))
    for outcome in outcomes:
        if outcome.result is not None:
            r = outcome.result
            line = f"{outcome.url}: version {r.previous_version} -> {r.version}, swap {r.timings.total_s:.3f} s"
            if outcome.rolled_back_to is not None:
                line += f"; rolled back to {outcome.rolled_back_to}"
            if outcome.rollback_error:
                line += f"; ROLLBACK FAILED: {outcome.rollback_error}"
        else:
            line = f"{outcome.url}: FAILED: {outcome.error}"
        print(line, file=sys.stdout if outcome.error is None else sys.stderr)
    skipped = urls[len(outcomes) :]
    for url in skipped:
        print(f"{url}: not attempted (rollout stopped)", file=sys.stderr)
    failed = [o.url for o in outcomes if o.error]
    if not failed:
        return 0
    mixed = [o.url for o in outcomes if o.result and o.rolled_back_to is None]
    state = (
        f"MIXED VERSIONS: {', '.join(mixed)} run the new version"
        if mixed
        else "no replica runs the new version"
    )
    raise AdminRequestError(f"update failed on {', '.join(failed)}; {state}")


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
