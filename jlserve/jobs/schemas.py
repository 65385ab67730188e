"""Bodies of the fine-tuning jobs API: OpenAI's shapes for clients, and the worker's protocol.

The client-facing objects (`FileObject`, `FineTuningJob`, `JobEvent`, `JobCheckpoint`,
`ListPage`) follow OpenAI's files and fine-tuning API, field for field, so the official
`openai` SDK reads them unchanged; jlserve's own additions (the served version a job made)
sit in extra fields the SDK keeps. The worker's requests (`ClaimRequest`, `LeaseRenewal`,
`EventBatch`, `FinishRequest`) are jlserve's own, under `/admin/jobs`.
Plain data: no torch and no vLLM, so the worker's light client imports it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FILE_PURPOSE = "fine-tune"
RESULT_PURPOSE = "fine-tune-results"  # files the jobs made (the delta, the metrics)
SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # also the task's name in the run
MAX_EPOCHS = 50
MAX_BATCH_SIZE = 256
MAX_LR_MULTIPLIER = 100.0


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobErrorCode(StrEnum):
    """Why a job failed: the `error.code` clients read, and the metrics' label."""

    INVALID_TRAINING_FILE = "invalid_training_file"  # the file's checks; the message names lines
    INVALID_VALIDATION_FILE = "invalid_validation_file"
    FILE_DELETED = "file_deleted"  # a file the job needs was deleted before it ran
    PARENT_CHANGED = "parent_changed"  # the served model changed while the job trained
    MODEL_OUT_OF_SYNC = "model_out_of_sync"  # the worker's run is not at the served model
    WORKER_LOST = "worker_lost"  # the worker stopped renewing its lease
    PUBLISH_REFUSED = "publish_refused"  # the server refused the job's delta
    TRAINING_FAILED = "training_failed"  # the worker's training stopped with an error


class ErrorObject(BaseModel):
    code: str
    message: str
    param: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error body: `{"error": {...}}`; the SDK raises it by HTTP status."""

    class Detail(BaseModel):
        message: str
        type: str = "invalid_request_error"
        param: str | None = None
        code: str | None = None

    error: Detail


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None
    sha256: str  # jlserve: the content's hash (files are stored by it)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Hyperparameters(BaseModel):
    """Supervised training settings; "auto" (or absent) keeps the worker's config value."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | int = "auto"
    batch_size: Literal["auto"] | int = "auto"
    learning_rate_multiplier: Literal["auto"] | float = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Literal["auto"] | int) -> Literal["auto"] | int:
        if v != "auto" and not 1 <= v <= MAX_EPOCHS:
            raise ValueError(f"n_epochs must be 'auto' or 1..{MAX_EPOCHS}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Literal["auto"] | int) -> Literal["auto"] | int:
        if v != "auto" and not 1 <= v <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 'auto' or 1..{MAX_BATCH_SIZE}")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v: Literal["auto"] | float) -> Literal["auto"] | float:
        if v != "auto" and not 0 < v <= MAX_LR_MULTIPLIER:
            raise ValueError(
                f"learning_rate_multiplier must be 'auto' or in (0, {MAX_LR_MULTIPLIER}]"
            )
        return v


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    """Only `supervised` trains here; other types are refused with `param` method.type."""

    model_config = ConfigDict(extra="allow")
    type: str
    supervised: SupervisedMethod | None = None


class CreateJobRequest(BaseModel):
    """`POST /v1/fine_tuning/jobs`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them
    integrations: list[Any] | None = None  # accepted only empty: none run here

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> CreateJobRequest:
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError("give hyperparameters in method.supervised, not both places")
        return self

    def settings(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class FineTuningJob(BaseModel):
    """OpenAI's job object, plus where the job left the served model."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: ErrorObject | None = None
    fine_tuned_model: str | None = None  # the served model's name: the same one, updated
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str = "jlserve"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    # jlserve: the task's name in the continual run, and the version the job published
    task: str
    version: int | None = None
    fingerprint: str | None = None
    parent_fingerprint: str | None = None  # the served model the job trained on
    cancel_requested: bool = False


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class JobCheckpoint(BaseModel):
    """The served version a job made (one per job): OpenAI's checkpoint object."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str  # "<model name>@<version>"
    fine_tuning_job_id: str
    metrics: dict[str, float | None]
    step_number: int
    version: int
    fingerprint: str
    delta_file: str  # the file id of the delta (purpose fine-tune-results)


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# ---------------------------------------------------------------- the worker's protocol


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker: str = Field(min_length=1, max_length=200)  # a name for logs and events


class Lease(BaseModel):
    id: str
    expires_at: float  # unix seconds
    duration_s: float


class ClaimResponse(BaseModel):
    """The next queued job, now running under `lease`, and the served model it must
    train on top of (its delta is published with If-Match on that fingerprint)."""

    job: FineTuningJob
    lease: Lease
    parent_version: int
    parent_fingerprint: str


class LeaseRenewal(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_id: str


class LeaseStatus(BaseModel):
    lease: Lease
    cancel_requested: bool  # stop at the next step and finish the job as cancelled


class WorkerEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: Literal["info", "warn", "error"] = "info"
    message: str = Field(max_length=4000)
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_id: str
    events: list[WorkerEvent] = Field(max_length=1000)


class FinishRequest(BaseModel):
    """The worker's last word on a job. `succeeded` needs the job published first."""

    model_config = ConfigDict(extra="forbid")
    lease_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    error: ErrorObject | None = None
    trained_tokens: int | None = Field(None, ge=0)
    metrics: dict[str, Any] | None = None  # the run's metrics after the task: a result file
    steps: int | None = Field(None, ge=0)  # optimizer steps the task took
    # the checkpoint's metrics (OpenAI's names: train_loss, full_valid_loss, ...)
    checkpoint_metrics: dict[str, float | None] | None = None

    @model_validator(mode="after")
    def _error_iff_failed(self) -> FinishRequest:
        if (self.status == "failed") != (self.error is not None):
            raise ValueError("error is given exactly when status is failed")
        return self


LEASE_HEADER = "x-jlserve-lease"  # the lease id on a publish (its body is the delta file)
