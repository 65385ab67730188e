"""Atomic file writes: plain standard library, so light modules (the version store, the
admin client's callers) can use them without importing torch."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# Files other processes read, as another user (a feed folder watched by replicas in
# containers): readable by all. Everything else stays private to its writer (0600).
SHARED_FILE_MODE = 0o644


def atomic_write_bytes(
    path: Path, data: bytes, mode: int | None = None, *, exclusive: bool = False
) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a part;
    with `mode` (e.g. SHARED_FILE_MODE) the file gets those permissions, else 0600. With
    `exclusive`, an existing `path` is never replaced (FileExistsError), even by a
    concurrent writer.

    The directory is synced after the rename, so once this returns the new file survives
    a power loss too (an acknowledged update is never lost). A failure of that sync is
    ignored: the new file is already the visible one, and some filesystems cannot sync
    directories.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if `path` exists
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
