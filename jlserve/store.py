"""The version store: what a server must remember to come back at the version it served.

A state directory holds

    state.json         the base checkpoint (path + fingerprint), the chain of applied
                       deltas (in order) and the history of operations
    deltas/            the applied delta files, byte for byte as uploaded
    rolled_back/       delta files undone by a rollback (kept for inspection)
    watch.json         what `--watch` did with each file it saw (see server.watch)

A model is identified by its fingerprint. The server numbers each version it accepts
(1, 2, ...) and never reuses a number, even after a rollback, so a number names one set
of weights for the life of the state dir (`last_version` remembers the highest).

Every write is atomic (write to a temporary file, fsync, rename), and `state.json` is
written last: a delta file without a chain entry is an update that never happened, so a
crash at any point leaves the previous or the next version, never a mix. Restart
replays the chain on the base checkpoint (see `SwapCoordinator.restore`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jlserve.errors import StateError
from jlserve.faults import FaultStep, fault_point
from jlserve.fsutil import atomic_write_bytes

STATE_FILE = "state.json"
DELTAS_DIR = "deltas"
ROLLED_BACK_DIR = "rolled_back"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class BaseCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    fingerprint: str


class ChainEntry(BaseModel):
    """One applied delta: the model is at `version` / `fingerprint` after it."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="assigned by the server; never reused")
    task: str
    fingerprint: str
    parent_fingerprint: str | None = None  # None in state files written before contract v2
    file: str  # relative to the state directory
    nnz: int
    applied_at: str


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event: Literal["apply", "rollback"]
    version: int  # the version after the operation
    from_version: int
    fingerprint: str
    from_fingerprint: str | None = None  # None in state files written before contract v2
    task: str | None = None
    seconds: float
    at: str


class StateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["jlserve.state"] = "jlserve.state"
    format_version: Literal[1] = 1
    base: BaseCheckpoint
    chain: list[ChainEntry] = Field(default_factory=list)
    history: list[HistoryEvent] = Field(default_factory=list)
    last_version: int = Field(0, ge=0, description="highest version number ever assigned")

    def highest_version(self) -> int:
        """`last_version`, or what a state file written before it existed implies."""
        seen = [e.version for e in self.chain] + [h.version for h in self.history]
        return max([self.last_version, *seen])


class VersionStore:
    """The state directory of one served model. Not thread-safe: the swap lock guards it."""

    def __init__(self, root: Path, state: StateFile) -> None:
        self.root = root
        self._state = state

    @classmethod
    def open(cls, root: Path, base_path: Path, base_fingerprint: str) -> VersionStore:
        """Open `root`, creating it for `base_path` if new; refuse a different base."""
        root = Path(root).resolve()
        state_path = root / STATE_FILE
        if state_path.exists():
            try:
                state = StateFile.model_validate_json(state_path.read_bytes())
            except (OSError, ValidationError) as exc:
                raise StateError(f"{state_path}: unreadable state file ({exc})") from None
            if state.base.fingerprint != base_fingerprint:
                raise StateError(
                    f"{root}: state belongs to base checkpoint {state.base.path} "
                    f"({state.base.fingerprint}), but --model {base_path} is {base_fingerprint}; "
                    "use another --state-dir"
                )
            return cls(root, state)
        try:
            (root / DELTAS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{root}: cannot create state directory ({exc})") from None
        store = cls(
            root,
            StateFile(
                base=BaseCheckpoint(
                    path=str(Path(base_path).resolve()), fingerprint=base_fingerprint
                )
            ),
        )
        store._write(store._state, fault_step=None)
        return store

    @property
    def base(self) -> BaseCheckpoint:
        return self._state.base

    @property
    def chain(self) -> list[ChainEntry]:
        return list(self._state.chain)

    @property
    def history(self) -> list[HistoryEvent]:
        return list(self._state.history)

    @property
    def version(self) -> int:
        return self._state.chain[-1].version if self._state.chain else 0

    @property
    def fingerprint(self) -> str:
        return self._state.chain[-1].fingerprint if self._state.chain else self.base.fingerprint

    @property
    def next_version(self) -> int:
        """The number the next accepted delta gets."""
        return self._state.highest_version() + 1

    def version_of(self, fingerprint: str) -> int | None:
        """The version of the served chain (0 = base) whose model is `fingerprint`."""
        if fingerprint == self.base.fingerprint:
            return 0
        return next((e.version for e in self._state.chain if e.fingerprint == fingerprint), None)

    def read_delta_bytes(self, entry: ChainEntry) -> bytes:
        try:
            return (self.root / entry.file).read_bytes()
        except OSError as exc:
            raise StateError(
                f"{self.root}: delta of version {entry.version} is missing ({exc})"
            ) from None

    def stage_delta(self, version: int, fingerprint: str, data: bytes) -> str:
        """Save an uploaded delta before it is applied; it counts only once committed."""
        name = f"{DELTAS_DIR}/v{version:05d}-{fingerprint.removeprefix('sha256:')[:16]}.safetensors"
        try:
            atomic_write_bytes(self.root / name, data)
        except OSError as exc:
            raise StateError(f"{self.root}: cannot save the delta ({exc})") from None
        return name

    def commit_apply(self, entry: ChainEntry, seconds: float) -> None:
        event = HistoryEvent(
            event="apply",
            version=entry.version,
            from_version=self.version,
            fingerprint=entry.fingerprint,
            from_fingerprint=self.fingerprint,
            task=entry.task,
            seconds=seconds,
            at=entry.applied_at,
        )
        self._write(
            self._state.model_copy(
                update={
                    "chain": [*self._state.chain, entry],
                    "history": [*self._state.history, event],
                    "last_version": max(self._state.highest_version(), entry.version),
                }
            ),
            fault_step=FaultStep.STATE_WRITE,
        )

    def commit_rollback(self, to_version: int, seconds: float) -> None:
        """Truncate the chain to `to_version`; undone delta files move to rolled_back/."""
        kept = [e for e in self._state.chain if e.version <= to_version]
        undone = [e for e in self._state.chain if e.version > to_version]
        fingerprint = kept[-1].fingerprint if kept else self.base.fingerprint
        event = HistoryEvent(
            event="rollback",
            version=to_version,
            from_version=self.version,
            fingerprint=fingerprint,
            from_fingerprint=self.fingerprint,
            seconds=seconds,
            at=utc_now(),
        )
        self._write(
            self._state.model_copy(
                update={
                    "chain": kept,
                    "history": [*self._state.history, event],
                    "last_version": self._state.highest_version(),
                }
            ),
            fault_step=FaultStep.STATE_WRITE,
        )
        (self.root / ROLLED_BACK_DIR).mkdir(exist_ok=True)
        for entry in undone:  # after the commit: a crash here only leaves a stray file
            src = self.root / entry.file
            if src.exists():
                os.replace(src, self.root / ROLLED_BACK_DIR / f"{time.time_ns()}-{src.name}")

    def _write(self, state: StateFile, fault_step: FaultStep | None) -> None:
        """Persist `state`, then adopt it: a failed write leaves memory and disk as they were.

        `fault_step` names the write for test fault injection (`jlserve.faults`): the
        writes that commit a swap are `state_write`, the first write of a new dir is none.
        """
        data = json.dumps(state.model_dump(mode="json"), indent=2).encode() + b"\n"
        try:
            if fault_step is not None:
                fault_point(fault_step)
            atomic_write_bytes(self.root / STATE_FILE, data)
        except OSError as exc:
            raise StateError(f"{self.root}: cannot write {STATE_FILE} ({exc})") from None
        self._state = state
