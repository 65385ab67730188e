"""`jlserve rollout`: put a delta into the feed every replica watches, and follow it.

Replicas of one model (docs/deployment.md, Kubernetes) each run `jlserve serve --watch
FEED` on one shared folder, mounted read-only. A new version reaches them when a file
lands in the feed: each replica applies it by lineage on its own. This module writes the
file (validated first, written under a temporary name then linked to its own, so a
replica never reads a part and no file is ever replaced) and then polls every replica's
`/admin/status` until each serves the delta's model (or took it and moved on to a later
one), or refused the file (its watch record says why), or the time is up. The report says when each
replica got there, how long the replicas disagreed, and which one lags and why.

Replicas are polled, so times have the poll interval's resolution. A replica that does
not answer (restarting, say) is retried until the time is up: a restarted replica
replays its versions and then the feed, so it converges like the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from jlserve.client import AdminClient, read_delta_bytes
from jlserve.errors import AdminRequestError, ServerUnreachableError
from jlserve.fsutil import SHARED_FILE_MODE, atomic_write_bytes
from jlserve.server.schemas import StatusResponse

POLL_TIMEOUT_S = 5.0  # one status request; a replica slower than this counts as not answering
UNREACHABLE = "unreachable"  # ReplicaProgress.problem of a replica that did not answer


@dataclass
class ReplicaProgress:
    """One replica during a rollout."""

    url: str
    version: int | None = None  # what it serves, as last seen
    fingerprint: str | None = None
    converged_s: float | None = None  # seconds from the publish to first seen having it
    moved_on: str | None = None  # took the delta, but now serves another model (how so)
    refused: str | None = None  # why it rejected the file (its watch record)
    denied: str | None = None  # its admin API refused us (token): it cannot be followed
    problem: str | None = None  # the last reason it has not taken the file yet
    unanswered: int = 0  # polls it did not answer

    @property
    def done(self) -> bool:
        return any(x is not None for x in (self.converged_s, self.refused, self.denied))


@dataclass(frozen=True)
class FeedDelta:
    """A delta file as the replicas see it in the feed."""

    name: str
    fingerprint: str  # the model it makes
    size: int  # bytes: tells this file's watch record from an older one of the same name


@dataclass
class RolloutReport:
    delta: FeedDelta
    replicas: list[ReplicaProgress]
    seconds: float = 0.0  # from the start of the follow to its end
    events: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return all(r.converged_s is not None for r in self.replicas)

    @property
    def disagreement_s(self) -> float | None:
        """From the first replica having the new model to the last; None until all do."""
        times = [r.converged_s for r in self.replicas if r.converged_s is not None]
        if len(times) < len(self.replicas):
            return None
        return max(times) - min(times)


def publish_to_feed(delta_file: Path, feed_dir: Path) -> tuple[FeedDelta, bool]:
    """Validate `delta_file` and write it into `feed_dir` under its own name; returns it
    and whether it was written. The same bytes already there are not written again;
    another file of that name is refused, never replaced (a replica handles a name once).
    """
    delta, data = _read(delta_file)
    if not feed_dir.is_dir():
        raise AdminRequestError(f"{feed_dir}: the feed is not a directory")
    if delta.name.startswith(".") or not delta.name.endswith(".safetensors"):
        raise AdminRequestError(
            f"{delta.name}: replicas read only files named *.safetensors, not starting with '.'"
        )
    target = feed_dir / delta.name
    try:
        atomic_write_bytes(target, data, mode=SHARED_FILE_MODE, exclusive=True)
    except FileExistsError:
        if read_delta_bytes(target) == data:
            return delta, False
        raise AdminRequestError(
            f"{target} exists with other contents; give the delta a new name (a replica "
            "handles each name once)"
        ) from None
    except OSError as exc:
        raise AdminRequestError(f"{target}: cannot write into the feed ({exc})") from None
    return delta, True


def delta_in_feed(delta_file: Path) -> FeedDelta:
    """A delta a writer already put into the feed (a trainer's --publish-dir)."""
    return _read(delta_file)[0]


def _read(delta_file: Path) -> tuple[FeedDelta, bytes]:
    """The fully validated delta (DeltaFormatError otherwise) and its bytes."""
    # Imported here: the delta parser needs torch, which `jlserve status|update` never load.
    from jlserve.delta import parse_delta

    data = read_delta_bytes(delta_file)
    child = parse_delta(data, source=str(delta_file)).metadata.child_fingerprint
    return FeedDelta(delta_file.name, child, len(data)), data


def follow(
    urls: Sequence[str],
    token: str | None,
    delta: FeedDelta,
    *,
    timeout_s: float,
    interval_s: float = 0.5,
    on_event: Callable[[str], None] = lambda _line: None,
) -> RolloutReport:
    """Poll every replica (all at once, each round) until each has taken `delta`,
    refused it, or refused us, or `timeout_s` has passed."""
    report = RolloutReport(delta, [ReplicaProgress(url) for url in urls])
    start = time.monotonic()

    def event(line: str) -> None:
        line = f"+{time.monotonic() - start:7.1f} s  {line}"
        report.events.append(line)
        on_event(line)

    with ExitStack() as stack:
        clients = {url: stack.enter_context(AdminClient(url, token)) for url in urls}
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(32, len(urls) or 1)))
        while True:
            pending = [r for r in report.replicas if not r.done]
            answers = pool.map(lambda r: _status(clients[r.url]), pending)
            now_s = time.monotonic() - start
            for replica, answer in zip(pending, answers, strict=True):
                _update(replica, answer, delta, now_s, event)
            report.seconds = time.monotonic() - start
            if all(r.done for r in report.replicas) or report.seconds >= timeout_s:
                return report
            time.sleep(interval_s)


def _status(client: AdminClient) -> StatusResponse | AdminRequestError:
    """The replica's status, or why there is none (a timeout counts as no answer)."""
    try:
        return client.status(timeout_s=POLL_TIMEOUT_S)
    except AdminRequestError as exc:
        return exc
    except httpx.TimeoutException:
        return ServerUnreachableError(f"no answer in {POLL_TIMEOUT_S:g} s")


def _update(
    replica: ReplicaProgress,
    answer: StatusResponse | AdminRequestError,
    delta: FeedDelta,
    now_s: float,
    event: Callable[[str], None],
) -> None:
    if isinstance(answer, AdminRequestError):
        if answer.status in (401, 403):
            replica.denied = str(answer)
            event(f"{replica.url}: cannot be followed: {answer}")
            return
        replica.unanswered += 1
        if replica.problem != UNREACHABLE:
            event(f"{replica.url}: no answer ({answer})")
        replica.problem = UNREACHABLE
        return
    status = answer
    if replica.problem == UNREACHABLE:
        event(f"{replica.url}: answers again, serving version {status.version}")
    replica.version, replica.fingerprint = status.version, status.fingerprint
    replica.problem = _problem(status, delta.name)
    record = status.watch.files.get(delta.name) if status.watch else None
    if record is not None and record.size != delta.size:
        record = None  # about an older file of that name
    if status.fingerprint == delta.fingerprint:
        replica.converged_s = now_s
        event(f"{replica.url}: serves version {status.version} ({status.fingerprint})")
    elif record is not None and record.outcome in ("applied", "already_served"):
        replica.converged_s = now_s  # took it, and has moved on since (a newer delta)
        replica.moved_on = f"{record.message}; now serves version {status.version}"
        event(f"{replica.url}: took it ({record.message}), now serves version {status.version}")
    elif record is not None and record.outcome == "rejected":
        replica.refused = record.message
        event(f"{replica.url}: REFUSED {delta.name}: {record.message}")


def _problem(status: StatusResponse, name: str) -> str | None:
    """Why this replica has not taken the file yet; None when nothing is known."""
    if status.degraded:
        return f"degraded: {status.degraded}"
    if status.watch is None:
        return "not watching a feed (started without --watch)"
    if name in status.watch.waiting:
        return (
            f"holds {name} but has not applied it: its parent is not served (it serves "
            f"{status.fingerprint}), or the last try failed for a reason that is not the "
            "file's (its log says)"
        )
    if name not in status.watch.files:
        return f"has not seen {name} in {status.watch.directory} yet"
    return None


def summary(report: RolloutReport) -> list[str]:
    """Lines for people: one per replica, then the verdict."""
    lines = []
    for r in report.replicas:
        if r.moved_on is not None:
            state = f"took it (seen at +{r.converged_s:.1f} s): {r.moved_on}"
        elif r.converged_s is not None:
            state = f"serves it since +{r.converged_s:.1f} s (version {r.version})"
        elif r.denied is not None:
            state = f"CANNOT BE FOLLOWED: {r.denied}"
        elif r.refused is not None:
            state = f"REFUSED it: {r.refused}; serves version {r.version} ({r.fingerprint})"
        else:
            served = "unknown" if r.version is None else f"version {r.version} ({r.fingerprint})"
            state = f"LAGS: serves {served}; {r.problem or 'no reason given'}"
        if r.unanswered:
            state += f"; {r.unanswered} polls unanswered"
        lines.append(f"{r.url}: {state}")
    n = len(report.replicas)
    if report.converged:
        moved = sum(r.moved_on is not None for r in report.replicas)
        verb = f"took (and {moved} moved on from)" if moved else "serve"
        lines.append(
            f"rollout done: all {n} replicas {verb} {report.delta.fingerprint} after "
            f"{report.seconds:.1f} s; they disagreed for {report.disagreement_s:.1f} s"
        )
    else:
        behind = [r.url for r in report.replicas if r.converged_s is None]
        lines.append(
            f"rollout INCOMPLETE after {report.seconds:.1f} s: {len(behind)} of {n} replicas "
            f"do not serve {report.delta.fingerprint} ({', '.join(behind)})"
        )
    return lines
