"""`jlserve rollout`: put a delta into the feed every replica watches, and follow it.

Replicas of one model (docs/deployment.md, Kubernetes) each run `jlserve serve --watch
FEED` on one shared folder, mounted read-only. A new version reaches them when a file
lands in the feed: each replica applies it by lineage on its own. This module writes the
file (validated first, written then renamed, so a replica never reads a part) and then
polls every replica's `/admin/status` until each serves the delta's model, or refused
the file (its watch record says why), or the time is up. The report says when each
replica got there, how long the replicas disagreed, and which one lags and why.

Replicas are polled, so times have the poll interval's resolution. A replica that does
not answer (restarting, say) is retried until the time is up: a restarted replica
replays its versions and then the feed, so it converges like the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from jlserve.client import AdminClient, read_delta_bytes
from jlserve.errors import AdminRequestError
from jlserve.fsutil import SHARED_FILE_MODE, atomic_write_bytes
from jlserve.server.schemas import StatusResponse

POLL_TIMEOUT_S = 5.0  # one status request; a replica slower than this counts as not answering


@dataclass
class ReplicaProgress:
    """One replica during a rollout."""

    url: str
    version: int | None = None  # what it serves, as last seen
    fingerprint: str | None = None
    converged_s: float | None = None  # seconds from the publish to first seen serving it
    refused: str | None = None  # why it rejected the file (its watch record)
    problem: str | None = None  # the last reason it could not be followed (unreachable, ...)
    unanswered: int = 0  # polls it did not answer

    @property
    def done(self) -> bool:
        return self.converged_s is not None or self.refused is not None


@dataclass
class RolloutReport:
    delta: str  # the file's name in the feed
    fingerprint: str  # the model it makes
    replicas: list[ReplicaProgress]
    seconds: float = 0.0  # from the publish to the end of the follow
    published: bool = False  # False: the same file was already in the feed
    events: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return all(r.converged_s is not None for r in self.replicas)

    @property
    def disagreement_s(self) -> float | None:
        """From the first replica serving the new model to the last; None until all do."""
        times = [r.converged_s for r in self.replicas]
        if any(t is None for t in times):
            return None
        return max(times) - min(times)  # type: ignore[type-var, operator]


def publish_to_feed(delta_file: Path, feed_dir: Path) -> tuple[str, str, bool]:
    """Validate `delta_file` and write it into `feed_dir` under its own name.

    Returns (name, child fingerprint, written). The same bytes already there are not
    written again; another file of that name is refused (a replica handles a name once).
    """
    data = read_delta_bytes(delta_file)
    fingerprint = _child(data, delta_file)
    if not feed_dir.is_dir():
        raise AdminRequestError(f"{feed_dir}: the feed is not a directory")
    name = delta_file.name
    if name.startswith(".") or not name.endswith(".safetensors"):
        raise AdminRequestError(
            f"{name}: replicas read only files named *.safetensors, not starting with '.'"
        )
    target = feed_dir / name
    if target.exists():
        if target.read_bytes() == data:
            return name, fingerprint, False
        raise AdminRequestError(
            f"{target} exists with other contents; give the delta a new name (a replica "
            "handles each name once)"
        )
    try:
        atomic_write_bytes(target, data, mode=SHARED_FILE_MODE)
    except OSError as exc:
        raise AdminRequestError(f"{target}: cannot write into the feed ({exc})") from None
    return name, fingerprint, True


def delta_in_feed(delta_file: Path) -> tuple[str, str]:
    """(name, child fingerprint) of a delta a writer already put into the feed."""
    return delta_file.name, _child(read_delta_bytes(delta_file), delta_file)


def _child(data: bytes, source: Path) -> str:
    """The child fingerprint of a fully validated delta (DeltaFormatError otherwise)."""
    # Imported here: the delta parser needs torch, which `jlserve status|update` never load.
    from jlserve.delta import parse_delta

    return parse_delta(data, source=str(source)).metadata.child_fingerprint


def follow(
    urls: Sequence[str],
    token: str | None,
    name: str,
    fingerprint: str,
    *,
    timeout_s: float,
    interval_s: float = 0.5,
    on_event: Callable[[str], None] = lambda _line: None,
) -> RolloutReport:
    """Poll every replica until each serves `fingerprint` or refused the file `name`."""
    report = RolloutReport(name, fingerprint, [ReplicaProgress(url) for url in urls])
    start = time.monotonic()

    def event(line: str) -> None:
        line = f"+{time.monotonic() - start:7.1f} s  {line}"
        report.events.append(line)
        on_event(line)

    with ExitStack() as stack:
        clients = {
            url: stack.enter_context(AdminClient(url, token, POLL_TIMEOUT_S)) for url in urls
        }
        while True:
            for replica in report.replicas:
                if not replica.done:
                    _poll(replica, clients[replica.url], report, time.monotonic() - start, event)
            report.seconds = time.monotonic() - start
            if all(r.done for r in report.replicas) or report.seconds >= timeout_s:
                return report
            time.sleep(interval_s)


def _poll(
    replica: ReplicaProgress,
    client: AdminClient,
    report: RolloutReport,
    now_s: float,
    event: Callable[[str], None],
) -> None:
    try:
        status = client.status()
    except (AdminRequestError, httpx.TimeoutException) as exc:
        replica.unanswered += 1
        if replica.problem != "unreachable":
            event(f"{replica.url}: no answer ({exc})")
        replica.problem = "unreachable"
        return
    if replica.problem == "unreachable":
        event(f"{replica.url}: answers again, serving version {status.version}")
    replica.problem = _problem(status, report.delta)
    replica.version, replica.fingerprint = status.version, status.fingerprint
    if status.fingerprint == report.fingerprint:
        replica.converged_s = now_s
        event(f"{replica.url}: serves version {status.version} ({status.fingerprint})")
        return
    record = status.watch.files.get(report.delta) if status.watch else None
    if record is not None and record.outcome == "rejected":
        replica.refused = record.message
        event(f"{replica.url}: REFUSED {report.delta}: {record.message}")


def _problem(status: StatusResponse, name: str) -> str | None:
    """Why this replica may never take the file, or wait for it; None when nothing is wrong."""
    if status.degraded:
        return f"degraded: {status.degraded}"
    if status.watch is None:
        return "not watching a feed (started without --watch)"
    if name in status.watch.waiting:
        return f"holds {name}, waiting for its parent to be served (serves {status.fingerprint})"
    if name not in status.watch.files:
        return f"has not seen {name} in {status.watch.directory} yet"
    return None


def summary(report: RolloutReport) -> list[str]:
    """Lines for people: one per replica, then the verdict."""
    lines = []
    for r in report.replicas:
        if r.converged_s is not None:
            state = f"serves it since +{r.converged_s:.1f} s (version {r.version})"
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
        lines.append(
            f"rollout done: all {n} replicas serve {report.fingerprint} after "
            f"{report.seconds:.1f} s; they disagreed for {report.disagreement_s:.1f} s"
        )
    else:
        behind = [r.url for r in report.replicas if r.converged_s is None]
        lines.append(
            f"rollout INCOMPLETE after {report.seconds:.1f} s: {len(behind)} of {n} replicas "
            f"do not serve {report.fingerprint} ({', '.join(behind)})"
        )
    return lines
