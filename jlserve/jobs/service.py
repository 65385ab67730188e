"""The fine-tuning jobs' life: validate, queue, lease to a worker, publish, finish.

    validating_files -> queued -> running -> succeeded | failed | cancelled

Jobs are one continual stream: one runs at a time, in the order they were created, each
trained by a worker on top of the version served when it claimed the job, and published
through the swap coordinator with `If-Match` on that version, so a model that changed
meanwhile (an update or rollback by someone else) fails the job instead of being
overwritten. The server keeps records only; training happens in `jlserve worker`
(trainer side), which reaches these methods over HTTP.

Recovery: a job's record says what happened last. At open, files still to validate are
validated again, every running job gets a full lease (the worker could not renew while
the server was down), and a publish that a crash interrupted is settled by looking for
its model in the served chain. A worker that stops renewing loses its job: failed
(`worker_lost`), or succeeded if its version was already published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, BinaryIO, Protocol

from jlserve.client import delta_child_fingerprint
from jlserve.errors import EngineUpdateError, JlserveError, PreconditionFailedError
from jlserve.jobs.schemas import (
    FILE_PURPOSE,
    RESULT_PURPOSE,
    ClaimResponse,
    CreateJobRequest,
    ErrorObject,
    FileObject,
    FineTuningJob,
    FinishRequest,
    JobCheckpoint,
    JobErrorCode,
    JobEvent,
    JobStatus,
    LeaseStatus,
    WorkerEvent,
)
from jlserve.jobs.store import ConflictError, JobStore, NotFoundError, new_id, now
from jlserve.server.metrics import JobMetrics
from jlserve.server.schemas import ApplyResponse
from jlserve.taskfile import (
    TaskFile,
    TaskFileError,
    TaskSplitError,
    held_out_size,
    read_task_file,
)
from jlserve.vocab import DEFAULT_LEASE_S

log = logging.getLogger("jlserve")

SWEEP_INTERVAL_S = 1.0
_FILE_CODES = {
    "training_file": JobErrorCode.INVALID_TRAINING_FILE,
    "validation_file": JobErrorCode.INVALID_VALIDATION_FILE,
}


class ServedModel(Protocol):
    """What the jobs need of the swap coordinator."""

    @property
    def version(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def degraded(self) -> str | None: ...

    def version_of(self, fingerprint: str) -> int | None: ...

    def apply_delta(
        self, data: bytes, source: str, if_match: str | None = None
    ) -> Awaitable[ApplyResponse]: ...


class RequestError(JlserveError):
    """A client's request refused with OpenAI's error shape (`param` names the field)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class JobService:
    def __init__(
        self,
        store: JobStore,
        model: ServedModel,
        model_name: str,
        metrics: JobMetrics,
        *,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.store = store
        self.model = model
        self.model_name = model_name  # what clients call the served model
        self.metrics = metrics
        self.lease_s = lease_s
        self._tasks: set[asyncio.Task] = set()

    async def open(self) -> None:
        """Recover after a start (see the module doc), then keep sweeping lapsed leases."""
        await self._run(self.store.extend_leases, self.lease_s)
        for job_id, child in (await self._run(self.store.publishing)).items():
            version = self.model.version_of(child)
            if version is not None:
                await self._record_published(job_id, version, child, delta_file=None)
            else:
                await self._run(self.store.clear_publishing, job_id)
            log.info(
                "job %s: a publish was interrupted; it %s",
                job_id,
                "landed" if version is not None else "did not land",
            )
        for job in await self._run(self.store.jobs_in, JobStatus.VALIDATING_FILES):
            self._spawn(self._validate(job))
        self._spawn(self._sweep_forever())
        await self._update_gauges()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------------ client side

    async def put_file(self, source: BinaryIO, filename: str, limit: int) -> FileObject:
        return await self._run(self.store.put_file, source, filename, FILE_PURPOSE, limit)

    async def file(self, file_id: str) -> FileObject:
        return await self._run(self.store.file, file_id)

    async def file_bytes(self, file_id: str) -> bytes:
        path = await self._run(self.store.file_path, file_id)
        return await self._run(path.read_bytes)

    async def files(
        self, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileObject], bool]:
        return await self._run(
            self.store.files, purpose=purpose, after=after, limit=limit, newest_first=newest_first
        )

    async def delete_file(self, file_id: str) -> None:
        await self._run(self.store.delete_file, file_id)

    async def job(self, job_id: str) -> FineTuningJob:
        return await self._run(self.store.job, job_id)

    async def jobs(self, after: str | None, limit: int) -> tuple[list[FineTuningJob], bool]:
        return await self._run(self.store.jobs, after=after, limit=limit)

    async def events(
        self, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobEvent], bool]:
        return await self._run(self.store.events, job_id, after=after, limit=limit)

    async def checkpoint(self, job_id: str) -> JobCheckpoint | None:
        return await self._run(self.store.checkpoint, job_id)

    async def create(self, request: CreateJobRequest) -> FineTuningJob:
        if request.model != self.model_name:
            raise RequestError(
                404,
                f"model {request.model!r} is not served here (this server serves "
                f"{self.model_name!r}; a job updates it in place)",
                param="model",
                code="model_not_found",
            )
        if request.method is not None and request.method.type != "supervised":
            raise RequestError(
                400,
                f"method.type {request.method.type!r}: only 'supervised' fine-tuning runs here",
                param="method.type",
            )
        if request.integrations:
            raise RequestError(400, "integrations are not supported", param="integrations")
        for param in ("training_file", "validation_file"):
            file_id = getattr(request, param)
            if file_id is None:
                continue
            try:
                found = await self._run(self.store.file, file_id)
            except NotFoundError:
                raise RequestError(404, f"{param} {file_id!r}: no such file", param=param) from None
            if found.purpose != FILE_PURPOSE:
                raise RequestError(
                    400,
                    f"{param} {file_id!r} has purpose {found.purpose!r}, not {FILE_PURPOSE!r}",
                    param=param,
                )
        if request.suffix is not None:
            await self._check_task_name(request.suffix)
        job_id = new_id("ftjob")
        settings = request.settings()
        job = FineTuningJob(
            id=job_id,
            created_at=now(),
            hyperparameters=settings,
            model=request.model,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            status=JobStatus.VALIDATING_FILES,
            training_file=request.training_file,
            validation_file=request.validation_file,
            metadata=request.metadata,
            method={"type": "supervised", "supervised": {"hyperparameters": settings.model_dump()}},
            user_provided_suffix=request.suffix,
            task=request.suffix or job_id.removeprefix("ftjob-")[:12],
        )
        await self._run(self.store.add_job, job)
        await self._run(self.store.add_event, job.id, f"Created fine-tuning job {job.id}", None)
        self._spawn(self._validate(job))
        await self._update_gauges()
        return job

    async def _check_task_name(self, name: str) -> None:
        """A suffix names the task in the continual run, so it must be new: no job that
        is waiting, running or has succeeded may have it."""
        live = (
            JobStatus.VALIDATING_FILES,
            JobStatus.QUEUED,
            JobStatus.RUNNING,
            JobStatus.SUCCEEDED,
        )
        for other in await self._run(self.store.jobs_in, *live):
            if other.task == name:
                raise RequestError(
                    409,
                    f"suffix {name!r} is the task of {other.id} ({other.status}); a task name "
                    "is used once in the continual run",
                    param="suffix",
                )

    async def cancel(self, job_id: str) -> FineTuningJob:
        """Queued: cancelled now. Running: the worker stops at its next step (its lease
        renewal says so) and finishes the job as cancelled; a worker that never answers
        loses the lease and the job ends cancelled. Published: too late (409)."""
        job = await self._run(self.store.job, job_id)
        if job.status.finished:
            raise ConflictError(f"job {job_id} already {job.status}")
        if job.version is not None:
            raise ConflictError(
                f"job {job_id} already published version {job.version}; roll the model back "
                "(jlserve rollback) to undo it"
            )
        if job.status is JobStatus.RUNNING:
            job = await self._run(
                self.store.update_job, job_id, expect=(JobStatus.RUNNING,), cancel_requested=True
            )
            await self._event(job_id, "Cancellation requested: the worker stops at its next step")
            return job
        job = await self._run(
            self.store.update_job,
            job_id,
            expect=(JobStatus.VALIDATING_FILES, JobStatus.QUEUED),
            status=JobStatus.CANCELLED,
        )
        await self._ended(job, "Job cancelled before it started")
        return job

    # ------------------------------------------------------------------ worker side

    async def claim(self) -> ClaimResponse | None:
        if self.model.degraded:
            return None  # nothing can be published; let jobs wait in the queue
        version, fingerprint = self.model.version, self.model.fingerprint  # read once
        claimed = await self._run(self.store.claim_next, self.lease_s, version, fingerprint)
        if claimed is None:
            return None
        job, lease = claimed
        await self._update_gauges()
        return ClaimResponse(
            job=job, lease=lease, parent_version=version, parent_fingerprint=fingerprint
        )

    async def renew(self, job_id: str, lease_id: str) -> LeaseStatus:
        lease, cancel = await self._run(self.store.renew, job_id, lease_id, self.lease_s)
        return LeaseStatus(lease=lease, cancel_requested=cancel)

    async def add_events(self, job_id: str, lease_id: str, events: list[WorkerEvent]) -> None:
        await self.renew(job_id, lease_id)  # only the lease holder speaks for the job
        await self._run(
            self.store.add_events, job_id, [(e.message, e.data, e.level, e.type) for e in events]
        )

    async def job_file(self, job_id: str, lease_id: str, which: str) -> bytes:
        """The content of the job's `training_file` or `validation_file`, for its worker."""
        await self.renew(job_id, lease_id)
        job = await self._run(self.store.job, job_id)
        file_id = {"training_file": job.training_file, "validation_file": job.validation_file}.get(
            which
        )
        if file_id is None:
            raise NotFoundError(f"job {job_id} has no {which}")
        return await self.file_bytes(file_id)

    async def publish(self, job_id: str, lease_id: str, data: bytes) -> FineTuningJob:
        """Serve the job's delta if the served model is still the one it trained on."""
        job = await self._run(self.store.job, job_id)
        await self.renew(job_id, lease_id)
        if job.cancel_requested:
            raise ConflictError(f"job {job_id} was cancelled; its delta is not published")
        child = delta_child_fingerprint(data)
        if job.version is not None and job.fingerprint == child:
            return job  # a worker's retry after the server recorded the publish
        await self._run(self.store.set_publishing, job_id, lease_id, child)
        try:
            result = await self.model.apply_delta(data, f"job {job_id}", job.parent_fingerprint)
        except PreconditionFailedError as exc:
            await self._fail(
                job_id,
                JobErrorCode.PARENT_CHANGED,
                f"the served model changed while the job trained: {exc}",
            )
            raise
        except (JlserveError, EngineUpdateError) as exc:
            await self._fail(
                job_id, JobErrorCode.PUBLISH_REFUSED, f"the server refused the job's delta: {exc}"
            )
            raise
        delta_file = await self._run(
            self.store.put_bytes, data, f"{job.task}.safetensors", RESULT_PURPOSE
        )
        return await self._record_published(
            job_id, result.version, result.fingerprint, delta_file.id
        )

    async def finish(self, job_id: str, request: FinishRequest) -> FineTuningJob:
        await self.renew(job_id, request.lease_id)  # nothing is written for a lost lease
        job = await self._run(self.store.job, job_id)
        if request.status == "succeeded" and job.version is None:
            raise ConflictError(f"job {job_id} cannot succeed before its delta is published")
        if request.status != "succeeded" and job.version is not None:
            raise ConflictError(
                f"job {job_id} already published version {job.version}; it succeeded"
            )
        files = list(job.result_files)
        checkpoint = await self._run(self.store.checkpoint, job_id)
        if checkpoint is not None and request.checkpoint_metrics:
            update = {"metrics": request.checkpoint_metrics, "step_number": request.steps or 0}
            await self._run(self.store.set_checkpoint, job_id, checkpoint.model_copy(update=update))
        if request.metrics is not None:
            made = await self._run(
                self.store.put_bytes,
                json.dumps(request.metrics, indent=1).encode(),
                f"{job.task}-metrics.json",
                RESULT_PURPOSE,
            )
            files.append(made.id)
        job = await self._run(
            self.store.update_job,
            job_id,
            expect=(JobStatus.RUNNING,),
            lease_id=request.lease_id,
            status=JobStatus(request.status),
            error=request.error,
            trained_tokens=request.trained_tokens,
            result_files=files,
        )
        message = {
            "succeeded": f"The job has successfully completed: {self.model_name} version {job.version}",
            "cancelled": "Job cancelled",
            "failed": f"Job failed: {request.error.message if request.error else ''}",
        }[request.status]
        await self._ended(job, message, level="error" if request.status == "failed" else "info")
        return job

    # ------------------------------------------------------------------ internals

    async def _validate(self, job: FineTuningJob) -> None:
        """The task file checks (`jlserve data check FILE`): a bad file fails the job and
        names its lines; nothing reaches a worker. Also what the worker would refuse
        later: a file too small to hold a share out without a validation file, and a
        validation file in the other format. (Lengths in tokens need the model's
        tokenizer: the worker checks those, dropping over-long examples.)"""
        read: dict[str, TaskFile] = {}
        for param in ("training_file", "validation_file"):
            file_id = getattr(job, param)
            if file_id is None:
                continue
            try:
                path = await self._run(self.store.file_path, file_id)
                read[param] = await asyncio.to_thread(read_task_file, path)
            except NotFoundError:
                await self._refuse_files(job, JobErrorCode.FILE_DELETED, param, "was deleted")
                return
            except TaskFileError as exc:
                problems = "\n".join(exc.report)
                await self._refuse_files(
                    job, _FILE_CODES[param], param, f"{exc.count} problem(s):\n{problems}"
                )
                return
        train, valid = read["training_file"], read.get("validation_file")
        if valid is None:
            try:
                held_out_size(len(train.examples))
            except TaskSplitError as exc:
                await self._refuse_files(
                    job, _FILE_CODES["training_file"], "training_file", str(exc)
                )
                return
        elif valid.format != train.format:
            await self._refuse_files(
                job,
                _FILE_CODES["validation_file"],
                "validation_file",
                f"{valid.format} format, but the training file is in {train.format} format",
            )
            return
        try:
            await self._run(
                self.store.update_job,
                job.id,
                expect=(JobStatus.VALIDATING_FILES,),
                status=JobStatus.QUEUED,
            )
        except ConflictError:  # cancelled meanwhile
            return
        await self._event(job.id, "Files validated, job queued")
        await self._update_gauges()

    async def _refuse_files(
        self, job: FineTuningJob, code: JobErrorCode, param: str, problem: str
    ) -> None:
        file_id = getattr(job, param)
        await self._fail(
            job.id,
            code,
            f"{param} {file_id}: {problem}",
            param=param,
            expect=(JobStatus.VALIDATING_FILES,),
        )

    async def _record_published(
        self, job_id: str, version: int, fingerprint: str, delta_file: str | None
    ) -> FineTuningJob:
        job = await self._run(self.store.job, job_id)
        files = [*job.result_files, delta_file] if delta_file else job.result_files
        job = await self._run(
            self.store.update_job,
            job_id,
            expect=(JobStatus.RUNNING,),
            version=version,
            fingerprint=fingerprint,
            fine_tuned_model=self.model_name,
            result_files=files,
        )
        await self._run(self.store.clear_publishing, job_id)
        checkpoint = JobCheckpoint(
            id=new_id("ftckpt"),
            created_at=now(),
            fine_tuned_model_checkpoint=f"{self.model_name}@{version}",
            fine_tuning_job_id=job_id,
            metrics={},
            step_number=0,
            version=version,
            fingerprint=fingerprint,
            delta_file=delta_file or "",
        )
        await self._run(self.store.set_checkpoint, job_id, checkpoint)
        await self._event(
            job_id,
            f"Published: {self.model_name} is now version {version} ({fingerprint})",
            {"version": version, "fingerprint": fingerprint},
        )
        return job

    async def _fail(
        self,
        job_id: str,
        code: JobErrorCode,
        message: str,
        *,
        param: str | None = None,
        expect: tuple[JobStatus, ...] = (JobStatus.RUNNING,),
    ) -> None:
        try:
            job = await self._run(
                self.store.update_job,
                job_id,
                expect=expect,
                status=JobStatus.FAILED,
                error=ErrorObject(code=code.value, message=message, param=param),
            )
        except ConflictError:  # it ended meanwhile (cancelled, finished by its worker)
            return
        await self._ended(job, f"Job failed ({code.value}): {message}", level="error")

    async def _ended(self, job: FineTuningJob, message: str, *, level: str = "info") -> None:
        await self._run(self.store.add_event, job.id, message, None, level=level)
        started = await self._run(self.store.started_at, job.id)
        self.metrics.ended(
            job.status.value,
            job.error.code if job.error else None,
            None if started is None else time.time() - started,
        )
        await self._update_gauges()

    async def _event(self, job_id: str, message: str, data: dict[str, Any] | None = None) -> None:
        await self._run(self.store.add_event, job_id, message, data)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except Exception:  # never let the sweeper die; the next round retries
                log.exception("jobs: lease sweep failed")

    async def sweep(self) -> None:
        """End the running jobs whose worker stopped renewing its lease."""
        for job in await self._run(self.store.expired):
            if job.version is not None:
                ended = await self._run(
                    self.store.update_job,
                    job.id,
                    expect=(JobStatus.RUNNING,),
                    status=JobStatus.SUCCEEDED,
                )
                await self._ended(
                    ended,
                    f"The worker stopped after publishing version {job.version}: the job succeeded without its final evaluation",
                    level="warn",
                )
            elif job.cancel_requested:
                ended = await self._run(
                    self.store.update_job,
                    job.id,
                    expect=(JobStatus.RUNNING,),
                    status=JobStatus.CANCELLED,
                )
                await self._ended(ended, "Job cancelled (the worker stopped)")
            else:
                await self._fail(
                    job.id,
                    JobErrorCode.WORKER_LOST,
                    f"the worker stopped renewing its lease ({self.lease_s:g} s); the served model is unchanged",
                )

    async def _update_gauges(self) -> None:
        self.metrics.set_counts(await self._run(self.store.counts))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)
