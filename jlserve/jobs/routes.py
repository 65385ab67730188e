"""HTTP routes of the jobs: OpenAI's files and fine-tuning API, and the worker's protocol.

Clients: `/v1/files` and `/v1/fine_tuning/jobs` in OpenAI's paths and shapes, so the
official SDK trains with `openai.OpenAI(base_url=URL + "/v1", api_key=<training token>)`.
They form their own small app (`build_training_app`) that `TrainingDispatch` hands those
paths to, ahead of vLLM's own middleware: the training token (by default the admin token)
guards them, not vLLM's inference key, and an upload is counted before it is buffered.

Workers: `/admin/jobs/...` (`build_worker_router`), under the admin guard: claim the next
job, renew the lease (which also carries cancellation), report events, publish the delta,
finish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jlserve.errors import EngineUpdateError, JlserveError
from jlserve.jobs.schemas import (
    FILE_PURPOSE,
    LEASE_HEADER,
    ClaimRequest,
    ClaimResponse,
    CreateJobRequest,
    EventBatch,
    FileDeleted,
    FileObject,
    FineTuningJob,
    FinishRequest,
    JobCheckpoint,
    LeaseRenewal,
    LeaseStatus,
    ListPage,
    OpenAIError,
)
from jlserve.jobs.service import JobService, RequestError
from jlserve.jobs.store import ConflictError, LeaseLostError, NotFoundError, TooLargeError
from jlserve.server.auth import AdminAuth
from jlserve.server.errors import AdminHTTPError, as_admin_error
from jlserve.server.routes import read_body

TRAINING_PREFIXES = ("/v1/files", "/v1/fine_tuning")
MULTIPART_SLACK = 64 * 1024  # headers and boundaries around the file in an upload
MAX_PAGE = 100


class _UploadTooLarge(Exception):
    pass


def _openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = OpenAIError(error=OpenAIError.Detail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _page(items: list[Any], has_more: bool) -> ListPage:
    return ListPage(
        data=items,
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise RequestError(400, f"limit must be 1..{MAX_PAGE}, got {limit}", param="limit")
    return limit


def build_training_app(service: Callable[[], JobService | None], max_file_bytes: int) -> FastAPI:
    """OpenAI's files and fine-tuning routes, bound to the service the plugin creates."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def jobs() -> JobService:
        found = service()
        if found is None:
            raise RequestError(503, "the server is still starting; retry shortly")
        return found

    @app.exception_handler(RequestError)
    async def _request_error(_r: Request, exc: RequestError) -> JSONResponse:
        return _openai_error(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(NotFoundError)
    async def _not_found(_r: Request, exc: NotFoundError) -> JSONResponse:
        return _openai_error(404, str(exc))

    @app.exception_handler(ConflictError)
    async def _conflict(_r: Request, exc: ConflictError) -> JSONResponse:
        return _openai_error(409, str(exc))

    @app.exception_handler(TooLargeError)
    async def _too_large(_r: Request, exc: TooLargeError) -> JSONResponse:
        return _openai_error(413, str(exc), param="file")

    @app.exception_handler(_UploadTooLarge)
    async def _upload_too_large(_r: Request, _exc: _UploadTooLarge) -> JSONResponse:
        return _openai_error(
            413, f"upload exceeds the limit of {max_file_bytes:,} bytes", param="file"
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p != "body"]
        param = ".".join(loc) or None
        return _openai_error(400, f"{param or 'body'}: {err['msg']}", param=param)

    @app.post("/v1/files", response_model=FileObject)
    async def upload(request: Request) -> FileObject:
        service_now = jobs()
        try:
            form = await request.form(max_files=1, max_fields=4)
        except _UploadTooLarge:
            raise
        except Exception as exc:  # malformed multipart: one clear line, not a traceback
            raise RequestError(
                400, f"expected a multipart upload with 'file' and 'purpose' ({exc})"
            ) from None
        upload = form.get("file")
        purpose = form.get("purpose")
        if purpose != FILE_PURPOSE:
            raise RequestError(
                400, f"purpose must be {FILE_PURPOSE!r}, got {purpose!r}", param="purpose"
            )
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "no file part named 'file' in the upload", param="file")
        name = (upload.filename or "upload.jsonl")[:255]
        return await service_now.put_file(upload.file, name, max_file_bytes)

    @app.get("/v1/files", response_model=ListPage)
    async def list_files(
        purpose: str | None = None, after: str | None = None, limit: int = 100, order: str = "desc"
    ) -> ListPage:
        if order not in ("asc", "desc"):
            raise RequestError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        found, more = await jobs().files(purpose, after, _limit(limit), order == "desc")
        return _page(found, more)

    @app.get("/v1/files/{file_id}", response_model=FileObject)
    async def get_file(file_id: str) -> FileObject:
        return await jobs().file(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        data = await jobs().file_bytes(file_id)
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted)
    async def delete_file(file_id: str) -> FileDeleted:
        await jobs().delete_file(file_id)
        return FileDeleted(id=file_id)

    @app.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
    async def create_job(body: CreateJobRequest) -> FineTuningJob:
        return await jobs().create(body)

    @app.get("/v1/fine_tuning/jobs", response_model=ListPage)
    async def list_jobs(after: str | None = None, limit: int = 20) -> ListPage:
        found, more = await jobs().jobs(after, _limit(limit))
        return _page(found, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
    async def get_job(job_id: str) -> FineTuningJob:
        return await jobs().job(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
    async def cancel_job(job_id: str) -> FineTuningJob:
        return await jobs().cancel(job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=ListPage)
    async def job_events(job_id: str, after: str | None = None, limit: int = 20) -> ListPage:
        found, more = await jobs().events(job_id, after, _limit(limit))
        return _page(found, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=ListPage)
    async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> ListPage:
        _limit(limit)
        found: JobCheckpoint | None = await jobs().checkpoint(job_id)
        items = [found] if found is not None and after is None else []
        return _page(items, False)

    return app


class TrainingDispatch:
    """ASGI middleware: the training paths go to the training app, behind their token;
    everything else goes on to vLLM's app unchanged. An upload past the size limit is
    refused from its Content-Length, or cut off as soon as its body passes the limit."""

    def __init__(
        self, app: ASGIApp, training: ASGIApp, auth: AdminAuth, max_file_bytes: int
    ) -> None:
        self.app = app
        self.training = training
        self.auth = auth
        self.max_body = max_file_bytes + MULTIPART_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = (
            scope["path"].removeprefix(scope.get("root_path", ""))
            if scope["type"] == "http"
            else ""
        )
        if not any(path == p or path.startswith(p + "/") for p in TRAINING_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self.auth.check(headers.get("authorization"))
        except AdminHTTPError as exc:
            await _openai_error(
                exc.status, exc.message.replace("admin route", "training route"), code=exc.type
            )(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _openai_error(
                413, f"upload of {int(declared):,} bytes exceeds the limit", param="file"
            )(scope, receive, send)
            return
        await self.training(scope, self._counted(receive), send)

    def _counted(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _UploadTooLarge()
            return message

        return counted


def build_worker_router(
    service: Callable[[], JobService | None], max_delta_bytes: int
) -> APIRouter:
    """`/admin/jobs/...`: the worker's side (under the admin guard)."""
    router = APIRouter(prefix="/admin/jobs")

    def jobs() -> JobService:
        found = service()
        if found is None:
            raise AdminHTTPError(503, "starting", "the server is still starting; retry shortly")
        return found

    def refused(exc: Exception) -> AdminHTTPError:
        if isinstance(exc, LeaseLostError):
            return AdminHTTPError(409, "lease_lost", str(exc))
        if isinstance(exc, NotFoundError):
            return AdminHTTPError(404, "not_found", str(exc))
        if isinstance(exc, ConflictError):
            return AdminHTTPError(409, "conflict", str(exc))
        return as_admin_error(exc)

    @router.post("/claim", response_model=ClaimResponse | None)
    async def claim(body: ClaimRequest) -> Response | ClaimResponse:
        """The next queued job under a new lease; 204 when there is none to run now."""
        claimed = await jobs().claim()
        return Response(status_code=204) if claimed is None else claimed

    @router.post("/{job_id}/lease", response_model=LeaseStatus)
    async def renew(job_id: str, body: LeaseRenewal) -> LeaseStatus:
        try:
            return await jobs().renew(job_id, body.lease_id)
        except JlserveError as exc:
            raise refused(exc) from None

    @router.post("/{job_id}/events")
    async def events(job_id: str, body: EventBatch) -> dict[str, int]:
        try:
            await jobs().add_events(job_id, body.lease_id, body.events)
        except JlserveError as exc:
            raise refused(exc) from None
        return {"added": len(body.events)}

    @router.get("/{job_id}/files/{which}")
    async def job_file(job_id: str, which: str, request: Request) -> Response:
        """The job's training_file or validation_file (lease id in x-jlserve-lease)."""
        try:
            data = await jobs().job_file(job_id, request.headers.get(LEASE_HEADER, ""), which)
        except JlserveError as exc:
            raise refused(exc) from None
        return Response(data, media_type="application/octet-stream")

    @router.post("/{job_id}/publish", response_model=FineTuningJob)
    async def publish(job_id: str, request: Request) -> FineTuningJob:
        """The body is the delta file; the lease id comes in the x-jlserve-lease header."""
        lease_id = request.headers.get(LEASE_HEADER)
        if not lease_id:
            raise AdminHTTPError(400, "bad_request", f"publish needs the {LEASE_HEADER} header")
        service_now = jobs()
        data = await read_body(request, max_delta_bytes)
        try:
            return await service_now.publish(job_id, lease_id, data)
        except (JlserveError, EngineUpdateError) as exc:
            raise refused(exc) from None

    @router.post("/{job_id}/finish", response_model=FineTuningJob)
    async def finish(job_id: str, body: FinishRequest) -> FineTuningJob:
        try:
            return await jobs().finish(job_id, body)
        except JlserveError as exc:
            raise refused(exc) from None

    return router
