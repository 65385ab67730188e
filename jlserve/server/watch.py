"""`--watch DIR`: apply delta files that appear in a directory, by lineage.

The directory may be read-only (a container mounts it so): nothing in it is ever moved
or written. What was done with each file is kept in the state dir (`watch.json`), keyed
by name, size and modification time, so a file is handled once, even across restarts
and rollbacks (a file applied once is not applied again after a rollback).

Each scan takes, among the files not yet handled, the one whose parent fingerprint is
the served model and applies it, and repeats; a file whose child is already served is
recorded as such; a file that fits nothing yet waits (a later scan may find its parent
served). A bad file (too large, malformed, a symlink, refused by the server) is
recorded as rejected with the reason, logged, and the watcher keeps going; a refusal
that is not the file's fault (degraded server, drain timeout, full disk, engine error)
leaves it waiting for the next scan. Writers must
write-then-rename (names starting with `.` are never read), so only complete files are
seen. Sizes are checked before reading; symlinks are never followed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jlserve.delta import parse_delta
from jlserve.errors import (
    DegradedError,
    DrainTimeoutError,
    EngineUpdateError,
    JlserveError,
    StateError,
)
from jlserve.fsutil import atomic_write_bytes
from jlserve.server.coordinator import SwapCoordinator
from jlserve.server.schemas import WatchOutcome, WatchRecord, WatchStatus
from jlserve.store import utc_now

log = logging.getLogger("jlserve.watch")

LEDGER_FILE = "watch.json"
DELTA_SUFFIX = ".safetensors"


class WatchLedger(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str
    files: dict[str, WatchRecord] = Field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    """A complete, well-formed delta file that fits no served model yet."""

    path: Path
    size: int
    mtime_ns: int
    parent: str
    child: str


class DeltaWatcher:
    def __init__(self, directory: Path, coordinator: SwapCoordinator, interval_s: float) -> None:
        self.directory = Path(directory)
        self._coordinator = coordinator
        self._interval_s = interval_s
        self._ledger_path = coordinator.store_root / LEDGER_FILE
        self._ledger = self._load_ledger()
        # name -> candidate: parsed once per (size, mtime), while it waits for its parent
        self._waiting: dict[str, _Candidate] = {}

    def report(self) -> WatchStatus:
        """For `/admin/status`: the ledger and the files waiting for their parent."""
        return WatchStatus(
            directory=self._ledger.directory,
            files=dict(self._ledger.files),
            waiting=sorted(self._waiting),
        )

    async def run(self) -> None:
        """Scan forever; any failure is logged, never fatal."""
        log.info(
            "watching %s for delta files (bookkeeping in %s)", self.directory, self._ledger_path
        )
        while True:
            try:
                await self.scan_once()
            except Exception:  # the watcher must outlive any bad file or filesystem error
                log.exception("watch %s: scan failed", self.directory)
            await asyncio.sleep(self._interval_s)

    async def scan_once(self) -> int:
        """Apply every waiting file that continues the served model; returns how many."""
        await asyncio.to_thread(self._refresh)
        applied = 0
        while True:
            served = self._coordinator.fingerprint
            for c in list(self._waiting.values()):
                if c.child == served:
                    self._record(c, "already_served", f"its model {c.child} is already served")
            ready = sorted((n, c) for n, c in self._waiting.items() if c.parent == served)
            if not ready:
                return applied
            name, candidate = ready[0]
            try:
                data = await asyncio.to_thread(self._read, candidate.path, candidate.size)
                result = await self._coordinator.apply_delta(
                    data, source=name, if_match=candidate.parent
                )
            except (DegradedError, DrainTimeoutError, StateError, EngineUpdateError) as exc:
                log.warning("watch: %s not applied now, retried next scan: %s", name, exc)
                return applied  # not the file's fault: it stays waiting
            except (JlserveError, OSError) as exc:
                self._record(candidate, "rejected", str(exc))
                continue
            self._record(
                candidate, "applied", f"applied as version {result.version}", result.version
            )
            log.info(
                "watch: applied %s -> version %d (%s)", name, result.version, result.fingerprint
            )
            applied += 1

    # ------------------------------------------------------------------ the directory

    def _refresh(self) -> None:
        """Parse new or changed files; forget waiting files that disappeared."""
        seen: set[str] = set()
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.startswith(".") or not name.endswith(DELTA_SUFFIX):
                continue
            seen.add(name)
            try:
                info = entry.stat(follow_symlinks=False)
                self._consider(Path(entry.path), info)
            except Exception as exc:  # one bad file never stops the scan
                log.error("watch: %s: %s", name, exc)
        for name in set(self._waiting) - seen:
            del self._waiting[name]

    def _consider(self, path: Path, info: os.stat_result) -> None:
        name = path.name
        key = (info.st_size, info.st_mtime_ns)
        done = self._ledger.files.get(name)
        if done is not None and (done.size, done.mtime_ns) == key:
            return
        waiting = self._waiting.get(name)
        if waiting is not None and (waiting.size, waiting.mtime_ns) == key:
            return
        self._waiting.pop(name, None)
        stub = _Candidate(path, info.st_size, info.st_mtime_ns, "", "")
        if stat.S_ISLNK(info.st_mode):
            self._record(stub, "rejected", "a symlink (not followed)")
            return
        if not stat.S_ISREG(info.st_mode):
            return
        limit = self._coordinator.max_delta_bytes
        if info.st_size > limit:
            self._record(stub, "rejected", f"{info.st_size} bytes, over the limit of {limit}")
            return
        try:
            data = self._read(path, info.st_size)
            meta = parse_delta(data, source=name, max_bytes=limit).metadata
        except (JlserveError, OSError) as exc:
            self._record(stub, "rejected", str(exc))
            return
        self._waiting[name] = _Candidate(
            path, info.st_size, info.st_mtime_ns, meta.parent_fingerprint, meta.child_fingerprint
        )

    @staticmethod
    def _read(path: Path, size: int) -> bytes:
        """The file's bytes, never through a symlink, and no more than `size` of them
        (a file that grew since it was sized is read again on the next scan)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(size + 1)
        if len(data) != size:
            raise OSError(errno.EAGAIN, f"{path.name} changed while being read")
        return data

    # ------------------------------------------------------------------ bookkeeping

    def _record(
        self, c: _Candidate, outcome: WatchOutcome, message: str, version: int | None = None
    ) -> None:
        name = c.path.name
        self._waiting.pop(name, None)
        self._ledger.files[name] = WatchRecord(
            size=c.size,
            mtime_ns=c.mtime_ns,
            outcome=outcome,
            message=message,
            version=version,
            at=utc_now(),
        )
        (log.error if outcome == "rejected" else log.info)(
            "watch: %s %s: %s", outcome, name, message
        )
        try:
            atomic_write_bytes(self._ledger_path, self._ledger.model_dump_json(indent=2).encode())
        except OSError as exc:  # kept in memory; a full state dir is reported by updates too
            log.error("watch: cannot write %s (%s)", self._ledger_path, exc)

    def _load_ledger(self) -> WatchLedger:
        fresh = WatchLedger(directory=str(self.directory.resolve()))
        try:
            ledger = WatchLedger.model_validate_json(self._ledger_path.read_bytes())
        except FileNotFoundError:
            return fresh
        except (OSError, ValidationError) as exc:
            log.error("watch: unreadable %s (%s); starting a new one", self._ledger_path, exc)
            return fresh
        return ledger if ledger.directory == fresh.directory else fresh
