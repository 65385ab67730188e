"""Request and response bodies of the admin API, shared by the server and the CLI client.

Plain data: no torch and no vLLM, so `jlserve update|status|rollback` start fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jlserve.store import BaseCheckpoint, ChainEntry, HistoryEvent
from jlserve.vocab import FINGERPRINT_PATTERN, ApplyPath, DrainTimeoutAction, SwapPolicy

VERSION_HEADER = "x-jlserve-model-version"
FINGERPRINT_HEADER = "x-jlserve-model-fingerprint"
IF_MATCH_HEADER = "if-match"  # compare-and-swap: the fingerprint the caller expects served


class Timings(BaseModel):
    """Seconds spent in each step of one update, as measured by the server."""

    parse_s: float = 0.0  # read + validate the delta file (no model needed)
    plan_s: float = 0.0  # check against the served model, compute new tensors
    stage_s: float = 0.0  # save the delta in the state dir
    wait_s: float = 0.0  # new requests held; in-flight ones finish (drain) or freeze
    apply_s: float = 0.0  # engine: load weights on every rank + clear prefix cache
    commit_s: float = 0.0  # state.json written
    paused_s: float = 0.0  # time new requests were held back (the client-visible swap)
    total_s: float = 0.0  # from request received to new version serving


class UpdateResponse(BaseModel):
    """What every change of the served model answers (apply or rollback).

    `applied` is False when the server already served the requested model: nothing was
    done, and `version` / `fingerprint` name what is served (an idempotent re-send).
    """

    applied: bool
    version: int
    fingerprint: str
    previous_version: int
    previous_fingerprint: str
    apply_path: ApplyPath
    swap_policy: SwapPolicy
    timings: Timings = Field(default_factory=Timings)
    sent_bytes: int = Field(
        0,
        description="weight bytes sent to each engine worker: in place, the changed "
        "positions (int64 index + value); reload, the whole tensors of the touched modules",
    )
    note: str | None = None  # e.g. how a client that timed out learned the outcome


class ApplyResponse(UpdateResponse):
    """`POST /admin/deltas`."""

    task: str
    nnz: int
    delta_version: int | None = Field(None, description="the advisory number inside the file")


class RollbackRequest(BaseModel):
    """`POST /admin/rollback`: exactly one of `to_version` and `to_fingerprint`."""

    model_config = ConfigDict(extra="forbid")

    to_version: int | None = Field(
        None, ge=0, description="a version of the served chain; 0 is the base"
    )
    to_fingerprint: str | None = Field(
        None, pattern=FINGERPRINT_PATTERN, description="a model of the served chain"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RollbackRequest:
        if (self.to_version is None) == (self.to_fingerprint is None):
            raise ValueError("give exactly one of to_version and to_fingerprint")
        return self


class RollbackResponse(UpdateResponse):
    """`POST /admin/rollback`."""


WatchOutcome = Literal["applied", "already_served", "rejected"]


class WatchRecord(BaseModel):
    """What the `--watch` folder's watcher did with one file (as it was when seen: size
    and mtime)."""

    model_config = ConfigDict(extra="forbid")

    size: int
    mtime_ns: int
    outcome: WatchOutcome
    message: str
    version: int | None = None  # the server's version number after applying it
    at: str


class WatchStatus(BaseModel):
    """The watched folder as this server sees it: what it did with each file, and which
    complete files wait for their parent to be served. A rollout across replicas reads it
    to say which replica refused a file and why."""

    directory: str
    files: dict[str, WatchRecord]
    waiting: list[str] = Field(description="well-formed files whose parent is not served yet")


class StatusResponse(BaseModel):
    """`GET /admin/status`."""

    version: int
    fingerprint: str
    base: BaseCheckpoint
    chain: list[ChainEntry]
    history: list[HistoryEvent]
    last_update: UpdateResponse | None
    next_version: int = Field(description="the number the next accepted delta gets")
    swap_policy: SwapPolicy
    drain_timeout_s: float
    drain_timeout_action: DrainTimeoutAction
    apply_path: ApplyPath
    engine_workers: int = Field(
        0, description="workers that report to every swap: TP ranks x data-parallel engines"
    )
    swap_in_progress: bool
    engine_weight_version: str | None = Field(
        None, description="vLLM's own weight_version label, `<version>:<fingerprint>`"
    )
    degraded: str | None = Field(
        None,
        description="why the server refuses updates and fails /health: the engine's weights "
        "are unknown (a failed restore) or the engine died",
    )
    watch: WatchStatus | None = Field(None, description="the `--watch` folder, when one is set")


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
