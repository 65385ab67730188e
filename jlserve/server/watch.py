"""`--watch DIR`: apply delta files that appear in a directory, in version order.

Writers must write-then-rename (a file named `.*` or `*.tmp` is never read), so only
complete files are seen. Each scan applies `v+1, v+2, ...` while present; a later version
waits for the missing one. Applied files move to `applied/`; a bad file (unreadable,
malformed, not fitting the model, stale version) moves to `rejected/` with
`NAME.error.txt` next to it, and the server keeps serving. Polling keeps this portable
and dependency-free; a scan of an idle directory costs a `listdir`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from jlserve.delta import parse_delta
from jlserve.engine.protocol import EngineUpdateError
from jlserve.errors import JlserveError
from jlserve.server.coordinator import SwapCoordinator

log = logging.getLogger("jlserve.watch")

APPLIED_DIR = "applied"
REJECTED_DIR = "rejected"
DELTA_SUFFIX = ".safetensors"


class DeltaWatcher:
    def __init__(self, directory: Path, coordinator: SwapCoordinator, interval_s: float) -> None:
        self.directory = Path(directory)
        self._coordinator = coordinator
        self._interval_s = interval_s
        # name -> (size, mtime_ns, version): parse each complete file once
        self._versions: dict[str, tuple[int, int, int]] = {}

    async def run(self) -> None:
        """Scan forever; one scan's failure is logged, never fatal."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log.info("watching %s for delta files", self.directory)
        while True:
            try:
                await self.scan_once()
            except OSError as exc:
                log.error("watch %s: %s", self.directory, exc)
            await asyncio.sleep(self._interval_s)

    async def scan_once(self) -> int:
        """Apply every file that continues the served chain; returns how many were applied."""
        applied = 0
        while True:
            pending = await asyncio.to_thread(self._pending_versions)
            next_version = self._coordinator.version + 1
            ready = [p for p, v in pending.items() if v == next_version]
            for path, version in pending.items():
                if version < next_version:
                    self._reject(
                        path, f"version {version} is not newer than the served {next_version - 1}"
                    )
            if not ready:
                return applied
            path = sorted(ready)[0]
            try:
                data = await asyncio.to_thread(path.read_bytes)
                result = await self._coordinator.apply_delta(data, source=path.name)
            except (JlserveError, EngineUpdateError, OSError) as exc:
                self._reject(path, str(exc))
                continue
            self._move(path, APPLIED_DIR)
            log.info("watch: applied %s -> version %d", path.name, result.version)
            applied += 1

    def _pending_versions(self) -> dict[Path, int]:
        """Version of each complete delta file in the directory; bad files are rejected."""
        found: dict[Path, int] = {}
        for entry in os.scandir(self.directory):
            name = entry.name
            if not entry.is_file() or name.startswith(".") or not name.endswith(DELTA_SUFFIX):
                continue
            stat = entry.stat()
            cached = self._versions.get(name)
            if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
                found[Path(entry.path)] = cached[2]
                continue
            path = Path(entry.path)
            try:
                delta = parse_delta(
                    path.read_bytes(), source=name, max_bytes=self._coordinator.max_delta_bytes
                )
            except (JlserveError, OSError) as exc:
                self._reject(path, str(exc))
                continue
            self._versions[name] = (stat.st_size, stat.st_mtime_ns, delta.metadata.version)
            found[path] = delta.metadata.version
        return found

    def _reject(self, path: Path, message: str) -> None:
        target = self._move(path, REJECTED_DIR)
        target.with_name(target.name + ".error.txt").write_text(message + "\n")
        log.error("watch: rejected %s: %s", path.name, message)

    def _move(self, path: Path, subdir: str) -> Path:
        (self.directory / subdir).mkdir(exist_ok=True)
        target = self.directory / subdir / path.name
        os.replace(path, target)
        self._versions.pop(path.name, None)
        return target
