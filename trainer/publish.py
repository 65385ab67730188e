"""Hand each task's delta to a running server, as soon as the task is merged.

Two ways, one interface:
- `ServerPublisher` (`--publish URL`): POSTs the delta to the admin API. Connection
  errors are retried with exponential backoff (the server may be restarting); a refusal
  (wrong parent, bad token, ...) stops the run with the server's message.
- `DirectoryPublisher` (`--publish-dir DIR`): writes the file into a directory that
  `jlserve serve --watch DIR` applies (write-then-rename, so the watcher never sees a
  partial file).

Publishing is idempotent, so `--resume` after a crash between publishing and the
task's commit point does not fail or double-apply: a server already serving the delta's
child fingerprint answers `applied: false` and is left alone. The server numbers the
versions itself; the version in a delta file is only the run's label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jlserve.client import AdminClient
from jlserve.delta import SparseDelta
from jlserve.errors import AdminRequestError, ServerUnreachableError
from jlserve.fsutil import SHARED_FILE_MODE, atomic_write_bytes
from trainer.errors import TrainerError


@dataclass(frozen=True)
class Receipt:
    note: str  # one line for the task summary
    swap_s: float | None = None  # the server's own swap time, when it applied the delta now


class Publisher(Protocol):
    """Where deltas go. `publish` returns a Receipt or raises TrainerError; it must be
    safe to call again with a delta already published (a resumed run does)."""

    def publish(self, delta: SparseDelta, data: bytes, file_name: str) -> Receipt: ...


class ServerPublisher:
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        attempts: int = 8,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.url, self.token = url, token
        self.attempts, self.first_backoff_s, self.max_backoff_s = (
            attempts,
            first_backoff_s,
            max_backoff_s,
        )

    def publish(self, delta: SparseDelta, data: bytes, file_name: str) -> Receipt:
        backoff, attempt = self.first_backoff_s, 1
        while True:
            try:
                return self._publish_once(delta, data)
            except ServerUnreachableError as exc:
                if attempt >= self.attempts:
                    raise TrainerError(
                        f"publish {file_name}: gave up after {attempt} attempts: {exc}"
                    ) from None
            except AdminRequestError as exc:
                raise TrainerError(f"publish {file_name}: {exc}") from None
            time.sleep(backoff)
            backoff, attempt = min(2 * backoff, self.max_backoff_s), attempt + 1

    def _publish_once(self, delta: SparseDelta, data: bytes) -> Receipt:
        with AdminClient(self.url, self.token) as client:
            result = client.update_bytes(data)
        task = delta.metadata.task
        if not result.applied:
            return Receipt(f"{task} already served by {self.url} as version {result.version}")
        swap_s = result.timings.total_s
        return Receipt(
            f"published {task} to {self.url} as version {result.version}: swap {swap_s:.3f} s",
            swap_s,
        )


class DirectoryPublisher:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def publish(self, delta: SparseDelta, data: bytes, file_name: str) -> Receipt:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.directory / file_name, data, mode=SHARED_FILE_MODE)
        except OSError as exc:
            raise TrainerError(f"publish {file_name} to {self.directory}: {exc}") from None
        return Receipt(f"wrote {self.directory / file_name}")
