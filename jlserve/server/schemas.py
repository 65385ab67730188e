"""Request and response bodies of the admin API, shared by the server and the CLI client."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from jlserve.engine.protocol import ApplyPath, SwapPolicy
from jlserve.store import BaseCheckpoint, ChainEntry, HistoryEvent

VERSION_HEADER = "x-jlserve-model-version"


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
    version: int
    previous_version: int
    fingerprint: str
    task: str | None = None
    nnz: int | None = None
    apply_path: ApplyPath
    swap_policy: SwapPolicy
    timings: Timings


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_version: int = Field(ge=0, description="a version in the applied chain; 0 is the base")


class StatusResponse(BaseModel):
    version: int
    fingerprint: str
    base: BaseCheckpoint
    chain: list[ChainEntry]
    history: list[HistoryEvent]
    last_update: UpdateResponse | None
    swap_policy: SwapPolicy
    apply_path: ApplyPath
    swap_in_progress: bool
    degraded: str | None = Field(
        None, description="set when an update failed and the previous weights could not be restored"
    )


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
