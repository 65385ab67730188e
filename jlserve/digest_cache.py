"""Per-tensor digests of the base checkpoint, cached in the state dir across restarts.

The base fingerprint proves which model a state dir belongs to, but computing it reads
every byte of the checkpoint (140 GB through sha256 at 70B: minutes before the first
request). The digests of each weight file are therefore cached in
`<state-dir>/base_digests.json` and reused only while that file is unchanged: same size,
same modification time (ns) and the same safetensors header (sha256 of its JSON, which
names every tensor with its dtype, shape and offsets). A file that differs in any of
these is re-hashed, and the server logs which file and why. A file rewritten in place
with identical size, header and mtime would go unnoticed: `--rehash-base` forces a full
re-hash for such cases.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from jlserve.checkpoint import TensorDigests, digest_tensors
from jlserve.fsutil import atomic_write_bytes
from jlserve.mapped import MappedCheckpoint, read_header

CACHE_FILE = "base_digests.json"
log = logging.getLogger("jlserve.digests")
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class FileStamp(BaseModel):
    """What must be unchanged for a file's cached digests to be trusted."""

    model_config = ConfigDict(extra="forbid")

    size: int
    mtime_ns: int
    header_sha256: Sha256Hex


class CachedFile(FileStamp):
    digests: dict[str, Sha256Hex]  # tensor name -> jlserve.checkpoint.tensor_digest


class DigestCacheFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["jlserve.base_digests"] = "jlserve.base_digests"
    format_version: Literal[1] = 1
    files: dict[str, CachedFile]  # by file name inside the checkpoint directory


def stamp(path: Path) -> FileStamp:
    st = path.stat()
    raw, _ = read_header(path)
    return FileStamp(
        size=st.st_size, mtime_ns=st.st_mtime_ns, header_sha256=hashlib.sha256(raw).hexdigest()
    )


@dataclass
class DigestReport:
    """How the base digests were obtained: which files were re-hashed, and why."""

    rehashed: dict[str, str] = field(default_factory=dict)  # file name -> reason
    cached: list[str] = field(default_factory=list)


def base_digests(
    tensors: MappedCheckpoint, state_dir: Path, *, force: bool = False
) -> tuple[TensorDigests, DigestReport, DigestCacheFile]:
    """The base checkpoint's digests, re-hashing only files the cache does not vouch for.

    Returns the digests, what was done, and the cache content to `save_cache` once the
    state dir is known to belong to this checkpoint. Pages read while hashing are
    released from this process afterwards (they stay in the page cache).
    """
    cache = _load_cache(Path(state_dir) / CACHE_FILE)
    by_file: dict[Path, list[str]] = {}
    for name, path in tensors.files.items():
        by_file.setdefault(path, []).append(name)
    report = DigestReport()
    entries: dict[str, CachedFile] = {}
    digests: dict[str, bytes] = {}
    for path, names in sorted(by_file.items()):
        current = stamp(path)
        cached = cache.files.get(path.name) if cache else None
        if force:
            reason: str | None = "--rehash-base"
        elif cache is None:
            reason = "no digest cache"
        else:
            reason = _distrust(cached, current, set(names))
        if reason is None and cached is not None:
            report.cached.append(path.name)
            file_digests = {n: bytes.fromhex(h) for n, h in cached.digests.items()}
        else:
            report.rehashed[path.name] = reason or "not in the digest cache"
            file_digests = digest_tensors(tensors, names)
        digests.update(file_digests)
        entries[path.name] = CachedFile(
            **current.model_dump(), digests={n: d.hex() for n, d in file_digests.items()}
        )
    if report.rehashed:
        tensors.release_pages()
    return TensorDigests.from_digests(digests), report, DigestCacheFile(files=entries)


def save_cache(state_dir: Path, content: DigestCacheFile) -> None:
    """Write the cache atomically; a failure only costs a re-hash on the next start."""
    try:
        atomic_write_bytes(Path(state_dir) / CACHE_FILE, content.model_dump_json(indent=1).encode())
    except OSError as exc:
        log.warning("could not write the digest cache in %s: %s", state_dir, exc)


def _load_cache(path: Path) -> DigestCacheFile | None:
    if not path.exists():
        return None
    try:
        return DigestCacheFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        log.warning("ignoring unreadable digest cache %s (%s); re-hashing", path, exc)
        return None


def _distrust(cached: CachedFile | None, current: FileStamp, names: set[str]) -> str | None:
    """Why the cached digests of a file cannot be used, or None when they can."""
    if cached is None:
        return "not in the digest cache"
    for what in ("size", "mtime_ns", "header_sha256"):
        if getattr(cached, what) != getattr(current, what):
            return f"{what} changed since the digests were cached"
    if set(cached.digests) != names:
        return "the cache lists other tensors"
    return None
