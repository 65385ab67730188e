"""The admin HTTP API (`/admin/...`): typed bodies, errors as JSON.

Every path under `ADMIN_PREFIX` is guarded by `auth.AdminAuthMiddleware` (the plugin
installs both), so the routes here never see an unauthenticated request.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request

from jlserve.errors import EngineUpdateError, JlserveError
from jlserve.server.coordinator import SwapCoordinator
from jlserve.server.errors import AdminHTTPError, as_admin_error
from jlserve.server.schemas import (
    IF_MATCH_HEADER,
    ApplyResponse,
    ErrorBody,
    RollbackRequest,
    RollbackResponse,
    StatusResponse,
    WatchStatus,
)

ADMIN_PREFIX = "/admin"
_ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 403, 409, 412, 413, 500, 503)}


def build_admin_router(
    coordinator: Callable[[], SwapCoordinator | None],
    watch: Callable[[], WatchStatus | None],
) -> APIRouter:
    """Routes bound to the coordinator the plugin creates once the engine is up, and to
    the `--watch` folder's report (None without one)."""

    def current() -> SwapCoordinator:
        found = coordinator()
        if found is None:
            raise AdminHTTPError(
                503, "starting", "the model is still being restored; retry shortly"
            )
        return found

    router = APIRouter(prefix=ADMIN_PREFIX, responses=_ERRORS)

    @router.post("/deltas", response_model=ApplyResponse)
    async def post_delta(request: Request) -> ApplyResponse:
        """Apply a delta file (the request body) whose parent is the served model; a delta
        whose child is already served answers `applied: false`. Optional `If-Match:
        <fingerprint>` makes it a compare-and-swap."""
        coord = current()
        data = await read_body(request, coord.max_delta_bytes)
        try:
            return await coord.apply_delta(data, "upload", _if_match(request))
        except (JlserveError, EngineUpdateError) as exc:
            raise as_admin_error(exc) from None

    @router.post("/rollback", response_model=RollbackResponse)
    async def post_rollback(body: RollbackRequest, request: Request) -> RollbackResponse:
        """Serve exactly an earlier model of the applied chain (by version or fingerprint)."""
        try:
            return await current().rollback(body, _if_match(request))
        except (JlserveError, EngineUpdateError) as exc:
            raise as_admin_error(exc) from None

    @router.get("/status", response_model=StatusResponse)
    async def get_status() -> StatusResponse:
        return current().status().model_copy(update={"watch": watch()})

    return router


def _if_match(request: Request) -> str | None:
    """The fingerprint of an `If-Match` header (quotes, as in an HTTP entity tag, allowed)."""
    value = request.headers.get(IF_MATCH_HEADER)
    return value.strip().strip('"') if value else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body (a delta file), refused with 413 as soon as it passes `limit`
    bytes and with 400 when empty."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise AdminHTTPError(
            413, "too_large", f"delta of {declared} bytes exceeds the limit of {limit}"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise AdminHTTPError(413, "too_large", f"delta exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise AdminHTTPError(
            400, "invalid_delta", "empty request body: send the delta file as the body"
        )
    return b"".join(chunks)
