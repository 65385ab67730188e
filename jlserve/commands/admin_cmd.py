"""`jlserve update|status|rollback|rollout`: talk to running `jlserve serve`s over their
admin API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from jlserve.client import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    URL_ENV,
    AdminClient,
    resolve_token,
    update_fleet,
)
from jlserve.errors import AdminRequestError
from jlserve.rollout import delta_in_feed, follow, publish_to_feed, summary
from jlserve.server.schemas import UpdateResponse


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        action="append",
        help=f"server URL (default: ${URL_ENV} or {DEFAULT_URL}); update and rollout take it repeatedly",
    )
    common.add_argument(
        "--admin-token-file",
        type=Path,
        help="admin token file (default: $JLSERVE_ADMIN_TOKEN_FILE, else $JLSERVE_ADMIN_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="print the server's JSON answer")
    common.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for an answer (rollout: for every replica to take the delta); "
        f"an update that times out is then checked by fingerprint (default {DEFAULT_TIMEOUT_S:g})",
    )

    replicas = argparse.ArgumentParser(add_help=False)
    replicas.add_argument(
        "--urls-file",
        type=Path,
        help="file with one replica URL per line (with or instead of --url)",
    )

    update = subparsers.add_parser(
        "update",
        parents=[common, replicas],
        help="apply a delta to a running server (or to several replicas, one after another)",
    )
    update.add_argument("--delta", type=Path, required=True, help="delta file (.safetensors)")
    update.add_argument(
        "--if-match",
        metavar="FINGERPRINT",
        help="apply only if the server serves this model (compare-and-swap)",
    )
    update.add_argument(
        "--no-rollback-on-failure",
        action="store_true",
        help="with several replicas: leave the updated ones at the new version if one fails",
    )
    update.set_defaults(func=_update)

    rollout = subparsers.add_parser(
        "rollout",
        parents=[common, replicas],
        help="put a delta into the feed replicas watch (--watch) and follow it until every "
        "replica serves it",
    )
    rollout.add_argument("--delta", type=Path, required=True, help="delta file (.safetensors)")
    rollout.add_argument(
        "--feed",
        type=Path,
        help="the feed folder to write the delta into (validated, written then renamed); "
        "without it the delta is already there (a trainer's --publish-dir wrote it)",
    )
    rollout.add_argument(
        "--interval", type=float, default=0.5, help="seconds between polls (default 0.5)"
    )
    rollout.set_defaults(func=_rollout)

    status = subparsers.add_parser("status", parents=[common], help="served version and history")
    status.set_defaults(func=_status)

    rollback = subparsers.add_parser("rollback", parents=[common], help="serve an earlier version")
    rollback.add_argument(
        "--to",
        required=True,
        help="version number (0 = base) or fingerprint (sha256:...) of the served chain",
    )
    rollback.add_argument(
        "--if-match", metavar="FINGERPRINT", help="only if the server serves this model"
    )
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
    return AdminClient(urls[0], resolve_token(args.admin_token_file), args.timeout)


def _print_update(result: UpdateResponse, as_json: bool) -> int:
    if as_json:
        print(result.model_dump_json(indent=2))
    elif not result.applied:
        print(
            f"already served: model version {result.version} ({result.fingerprint}); nothing done"
        )
    else:
        t = result.timings
        print(
            f"model version {result.previous_version} -> {result.version} ({result.fingerprint}); "
            f"swap {t.total_s:.3f} s (requests held {t.paused_s:.3f} s, apply {t.apply_s:.3f} s)"
        )
    if result.note and not as_json:
        print(f"note: {result.note}")
    return 0


def _update(args: argparse.Namespace) -> int:
    urls = _urls(args)
    if len(urls) == 1:
        with _client(args) as client:
            return _print_update(client.update(args.delta, args.if_match), args.json)
    if args.if_match:
        raise AdminRequestError("--if-match takes one --url (replicas may serve different models)")
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
            line = (
                f"{outcome.url}: version {r.previous_version} -> {r.version}, "
                f"swap {r.timings.total_s:.3f} s"
                if r.applied
                else f"{outcome.url}: already served (version {r.version})"
            )
            if outcome.rolled_back_to is not None:
                line += f"; rolled back to {outcome.rolled_back_to}"
            if outcome.rollback_error:
                line += f"; ROLLBACK FAILED: {outcome.rollback_error}"
        else:
            line = f"{outcome.url}: FAILED: {outcome.error}"
        served = (
            f"version {outcome.version} {outcome.fingerprint}" if outcome.fingerprint else "unknown"
        )
        line += f"; serves {served}"
        print(line, file=sys.stdout if outcome.error is None else sys.stderr)
    skipped = urls[len(outcomes) :]
    for url in skipped:
        print(f"{url}: not attempted (rollout stopped)", file=sys.stderr)
    failed = [o.url for o in outcomes if o.error]
    child = next((o.result.fingerprint for o in outcomes if o.result), None)
    on_new = [o.url for o in outcomes if o.fingerprint is not None and o.fingerprint == child]
    elsewhere = [o.url for o in outcomes if o.fingerprint not in (None, child)]
    unknown = [o.url for o in outcomes if o.fingerprint is None] + skipped
    if not failed and not elsewhere and not unknown:
        return 0
    if on_new and (elsewhere or unknown):
        state = f"MIXED VERSIONS: {', '.join(on_new)} serve the new model {child}"
    elif on_new:
        state = f"every replica reached serves the new model {child}"
    else:
        state = "no replica serves the new model"
    if elsewhere:
        state += f"; {', '.join(elsewhere)} serve another model"
    if unknown:
        state += f"; {', '.join(unknown)}: model unknown"
    raise AdminRequestError(f"update failed on {', '.join(failed) or 'no replica'}; {state}")


def _rollout(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise AdminRequestError(f"--interval {args.interval:g}: give a positive number of seconds")
    urls = _urls(args)
    token = resolve_token(args.admin_token_file)
    if args.feed is not None:
        delta, written = publish_to_feed(args.delta, args.feed)
        how = "written to" if written else "already in"
        print(f"{delta.name} ({delta.fingerprint}) {how} {args.feed}", file=sys.stderr)
    else:
        delta = delta_in_feed(args.delta)
    report = follow(
        urls,
        token,
        delta,
        timeout_s=args.timeout,
        interval_s=args.interval,
        on_event=(lambda _line: None) if args.json else (lambda line: print(line, file=sys.stderr)),
    )
    if args.json:
        body = dataclasses.asdict(report)
        body.update(converged=report.converged, disagreement_s=report.disagreement_s)
        print(json.dumps(body, indent=2))
    else:
        print("\n".join(summary(report)))
    return 0 if report.converged else 1


def _rollback(args: argparse.Namespace) -> int:
    target = str(args.to)
    by_fingerprint = target.startswith("sha256:")
    if not by_fingerprint and not target.isdigit():
        raise AdminRequestError(f"--to {target}: give a version number or a sha256: fingerprint")
    with _client(args) as client:
        result = (
            client.rollback(to_fingerprint=target, if_match=args.if_match)
            if by_fingerprint
            else client.rollback(to_version=int(target), if_match=args.if_match)
        )
    return _print_update(result, args.json)


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status.model_dump(mode="json"), indent=2))
        return 0
    print(f"version {status.version}  {status.fingerprint}")
    print(f"base    {status.base.path}  ({status.base.fingerprint})")
    print(
        f"swap policy {status.swap_policy} (drain timeout {status.drain_timeout_s:g} s, then "
        f"{status.drain_timeout_action}), apply path {status.apply_path}"
    )
    for entry in status.chain:
        print(
            f"  v{entry.version}  {entry.fingerprint}  {entry.task}  nnz={entry.nnz}  {entry.applied_at}"
        )
    if status.last_update:
        print(f"last update: {status.last_update.timings.total_s:.3f} s")
    if status.degraded:
        print(f"DEGRADED: {status.degraded}")
    return 0
