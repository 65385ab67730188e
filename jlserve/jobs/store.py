"""Where jobs, files and events live: SQLite (WAL) plus file contents stored by hash.

    STATE_DIR/jobs/jobs.db           files, jobs, events and checkpoints (one row each)
    STATE_DIR/jobs/files/<sha256>    each uploaded or produced file's bytes, once

Crash consistency, as the version store's: every change is one SQLite transaction
(WAL, synchronous=FULL), so a server killed at any point reopens with each job wholly
before or after its last change. File bytes are written (fsynced, renamed into place)
before the row that names them is committed, and removed only after the last row naming
them is gone; contents no row names (a crash between the two steps) are removed at open.
A user's file name is a column, never a path. The store is synchronous and thread-safe
(one connection behind a lock); the async service calls it from worker threads.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from jlserve.errors import JlserveError, StateError
from jlserve.jobs.schemas import (
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    JobStatus,
    Lease,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    sha256 TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    lease_id TEXT,
    lease_expires REAL,
    publishing TEXT,            -- the child fingerprint of a publish under way
    started_at REAL,
    doc TEXT NOT NULL           -- the FineTuningJob
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
"""
CHUNK = 1 << 20
JOBS_DIR = "jobs"  # under the server's state dir


class NotFoundError(JlserveError):
    """No such file, job or checkpoint (answered 404)."""


class ConflictError(JlserveError):
    """The request does not fit the object's state (answered 409)."""


class LeaseLostError(ConflictError):
    """The worker's lease is not the job's current one (lapsed, or the job ended)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "files"
        self.blobs.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.root / "jobs.db", check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(
                f"{self.root / 'jobs.db'}: cannot open the jobs database ({exc})"
            ) from None
        self._lock = threading.RLock()  # re-entered by delete_file
        self._remove_unnamed_blobs()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE: writers queue instead of failing)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ files

    def put_file(self, source: BinaryIO, filename: str, purpose: str, limit: int) -> FileObject:
        """Copy `source` into the store (hashing as it goes) and record it.
        Raises `TooLargeError` past `limit` bytes, with nothing kept."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise TooLargeError(f"file exceeds the limit of {limit:,} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            return self._add_file(Path(tmp), digest.hexdigest(), size, filename, purpose)
        finally:
            Path(tmp).unlink(missing_ok=True)  # moved into place, or left by a failure

    def put_bytes(self, data: bytes, filename: str, purpose: str) -> FileObject:
        """Store bytes the server made (a job's delta, its metrics)."""
        return self.put_file(io.BytesIO(data), filename, purpose, limit=len(data))

    def _add_file(
        self, staged: Path, sha: str, size: int, filename: str, purpose: str
    ) -> FileObject:
        """Move the staged bytes into place and record them, in one transaction: a delete
        of the same content (which removes the bytes in its transaction) comes wholly
        before or after, never between the two."""
        record = FileObject(
            id=new_id("file"),
            bytes=size,
            created_at=now(),
            filename=filename,
            purpose=purpose,
            sha256=sha,
        )
        with self._tx() as db:
            os.replace(staged, self.blobs / sha)  # same bytes, same name: harmless to replace
            db.execute(
                "INSERT INTO files (id, sha256, doc) VALUES (?, ?, ?)",
                (record.id, sha, record.model_dump_json()),
            )
        return record

    def file(self, file_id: str) -> FileObject:
        with self._lock:
            row = self._db.execute("SELECT doc FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no file {file_id!r}")
        return FileObject.model_validate_json(row[0])

    def file_path(self, file_id: str) -> Path:
        return self.blobs / self.file(file_id).sha256

    def files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileObject], bool]:
        where = [] if purpose is None else [("json_extract(doc, '$.purpose') = ?", purpose)]
        rows = self._page("files", after, limit, newest_first, where)
        return [FileObject.model_validate_json(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> None:
        """Remove a file; refused (ConflictError) while an unfinished job needs it."""
        record = self.file(file_id)
        with self._lock:  # the bytes go after the commit, before any upload can add a row
            with self._tx() as db:
                for (doc,) in db.execute("SELECT doc FROM jobs WHERE status IN (?, ?, ?)", _ACTIVE):
                    job = FineTuningJob.model_validate_json(doc)
                    if file_id in (job.training_file, job.validation_file):
                        raise ConflictError(
                            f"file {file_id} is used by {job.id} ({job.status}); cancel the "
                            "job or wait for it to finish"
                        )
                db.execute("DELETE FROM files WHERE id = ?", (file_id,))
                shared = db.execute(
                    "SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (record.sha256,)
                ).fetchone()
            if shared is None:
                (self.blobs / record.sha256).unlink(missing_ok=True)

    def _remove_unnamed_blobs(self) -> None:
        with self._lock:
            named = {sha for (sha,) in self._db.execute("SELECT sha256 FROM files")}
        for path in self.blobs.iterdir():
            if path.name not in named:  # a crash between the bytes and their row, or an upload
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ jobs

    def add_job(self, job: FineTuningJob) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, status, doc) VALUES (?, ?, ?)",
                (job.id, job.status.value, job.model_dump_json()),
            )

    def job(self, job_id: str) -> FineTuningJob:
        with self._lock:
            row = self._db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}")
        return FineTuningJob.model_validate_json(row[0])

    def jobs(self, *, after: str | None, limit: int) -> tuple[list[FineTuningJob], bool]:
        rows = self._page("jobs", after, limit, newest_first=True, where=[])
        return [FineTuningJob.model_validate_json(r) for r in rows[:limit]], len(rows) > limit

    def jobs_in(self, *statuses: JobStatus) -> list[FineTuningJob]:
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT doc FROM jobs WHERE status IN ({marks}) ORDER BY seq",
                [s.value for s in statuses],
            ).fetchall()
        return [FineTuningJob.model_validate_json(r[0]) for r in rows]

    def update_job(
        self,
        job_id: str,
        *,
        expect: tuple[JobStatus, ...],
        lease_id: str | None = None,
        **changes: Any,
    ) -> FineTuningJob:
        """Change a job's fields if its status is one of `expect` (and, with `lease_id`,
        if that is its lease): a compare-and-set, so two writers never both win. A job
        leaving `running` gives up its lease."""
        with self._tx() as db:
            job = self._locked_job(db, job_id)
            if job.status not in expect:
                raise ConflictError(f"job {job_id} is {job.status}")
            if lease_id is not None:
                self._check_lease(db, job_id, lease_id)
            updated = job.model_copy(update=changes)
            if updated.status.finished and updated.finished_at is None:
                updated.finished_at = now()
            keep_lease = updated.status is JobStatus.RUNNING
            db.execute(
                "UPDATE jobs SET status = ?, doc = ?, lease_id = CASE WHEN ? THEN lease_id END, "
                "lease_expires = CASE WHEN ? THEN lease_expires END WHERE id = ?",
                (updated.status.value, updated.model_dump_json(), keep_lease, keep_lease, job_id),
            )
        return updated

    def claim_next(
        self, lease_s: float, parent_version: int, parent_fingerprint: str
    ) -> tuple[FineTuningJob, Lease] | None:
        """The oldest queued job, now running under a new lease; None while a job runs
        (one job at a time: each trains on top of the previous one's version) or none
        is queued."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE status = 'running' LIMIT 1").fetchone():
                return None
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            job = self._locked_job(db, row[0]).model_copy(
                update={"status": JobStatus.RUNNING, "parent_fingerprint": parent_fingerprint}
            )
            lease = Lease(id=new_id("lease"), expires_at=time.time() + lease_s, duration_s=lease_s)
            db.execute(
                "UPDATE jobs SET status = 'running', lease_id = ?, lease_expires = ?, "
                "started_at = ?, doc = ? WHERE id = ?",
                (lease.id, lease.expires_at, time.time(), job.model_dump_json(), job.id),
            )
        self.add_event(job.id, f"Job started on top of version {parent_version}", None)
        return job, lease

    def renew(self, job_id: str, lease_id: str, lease_s: float) -> tuple[Lease, bool]:
        with self._tx() as db:
            self._check_lease(db, job_id, lease_id)
            expires = time.time() + lease_s
            db.execute("UPDATE jobs SET lease_expires = ? WHERE id = ?", (expires, job_id))
            job = self._locked_job(db, job_id)
        return Lease(id=lease_id, expires_at=expires, duration_s=lease_s), job.cancel_requested

    def extend_leases(self, lease_s: float) -> None:
        """Give every running job a full lease again (at open: a worker cannot renew while
        the server is down, and a restart must not cost it the job)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE status = 'running'",
                (time.time() + lease_s,),
            )

    def expired(self) -> list[FineTuningJob]:
        """Running jobs whose lease lapsed (not those whose publish the server is doing)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT doc FROM jobs WHERE status = 'running' AND lease_expires < ? "
                "AND publishing IS NULL",  # a publish under way ends the job itself
                (time.time(),),
            ).fetchall()
        return [FineTuningJob.model_validate_json(r[0]) for r in rows]

    def set_publishing(self, job_id: str, lease_id: str, child: str | None) -> None:
        """Record (or clear, with None) the model a publish is about to serve: after a
        crash, the server looks for it in its chain to learn whether the publish landed."""
        with self._tx() as db:
            self._check_lease(db, job_id, lease_id)
            db.execute("UPDATE jobs SET publishing = ? WHERE id = ?", (child, job_id))

    def clear_publishing(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET publishing = NULL WHERE id = ?", (job_id,))

    def publishing(self) -> dict[str, str]:
        """{job id: child fingerprint} of the publishes a crash may have interrupted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, publishing FROM jobs WHERE status = 'running' AND publishing IS NOT NULL"
            ).fetchall()
        return dict(rows)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s.value: 0 for s in JobStatus} | dict(rows)

    def started_at(self, job_id: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT started_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row[0]

    def _locked_job(self, db: sqlite3.Connection, job_id: str) -> FineTuningJob:
        row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}")
        return FineTuningJob.model_validate_json(row[0])

    @staticmethod
    def _check_lease(db: sqlite3.Connection, job_id: str, lease_id: str) -> None:
        row = db.execute("SELECT status, lease_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}")
        if row[0] != JobStatus.RUNNING or row[1] != lease_id:
            raise LeaseLostError(
                f"job {job_id} is {row[0]}"
                + ("" if row[0] != JobStatus.RUNNING else " under another lease")
                + ": this worker no longer holds it"
            )

    # ------------------------------------------------------------------ events, checkpoints

    def add_event(
        self,
        job_id: str,
        message: str,
        data: dict[str, Any] | None,
        *,
        level: str = "info",
        type_: str = "message",
    ) -> JobEvent:
        return self.add_events(job_id, [(message, data, level, type_)])[0]

    def add_events(
        self, job_id: str, events: list[tuple[str, dict[str, Any] | None, str, str]]
    ) -> list[JobEvent]:
        made = [
            JobEvent(id=new_id("ftevent"), created_at=now(), message=m, data=d, level=lv, type=t)  # type: ignore[arg-type]
            for m, d, lv, t in events
        ]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO events (id, job_id, doc) VALUES (?, ?, ?)",
                [(e.id, job_id, e.model_dump_json()) for e in made],
            )
        return made

    def events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
        """Newest first, as OpenAI lists them; `after` is the last event id of a page."""
        self.job(job_id)
        rows = self._page("events", after, limit, newest_first=True, where=[("job_id = ?", job_id)])
        return [JobEvent.model_validate_json(r) for r in rows[:limit]], len(rows) > limit

    def set_checkpoint(self, job_id: str, checkpoint: JobCheckpoint) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (job_id, doc) VALUES (?, ?)",
                (job_id, checkpoint.model_dump_json()),
            )

    def checkpoint(self, job_id: str) -> JobCheckpoint | None:
        self.job(job_id)
        with self._lock:
            row = self._db.execute(
                "SELECT doc FROM checkpoints WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else JobCheckpoint.model_validate_json(row[0])

    def _page(
        self,
        table: str,
        after: str | None,
        limit: int,
        newest_first: bool,
        where: list[tuple[str, Any]],
    ) -> list[str]:
        """Up to limit + 1 docs of `table` matching `where` ((SQL condition, parameter)
        pairs) after the row `after`: cursor paging by insertion order."""
        conditions = [condition for condition, _ in where]
        params = [value for _, value in where]
        if after is not None:
            with self._lock:
                row = self._db.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise NotFoundError(f"after={after!r}: no such object")
            conditions.append("seq < ?" if newest_first else "seq > ?")
            params.append(row[0])
        sql = f"SELECT doc FROM {table}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        with self._lock:
            return [r[0] for r in self._db.execute(sql, [*params, limit + 1])]


class TooLargeError(JlserveError):
    """An upload over the size limit (answered 413)."""


_ACTIVE = (JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
