"""Mapping of jlserve errors to HTTP answers: one JSON body naming the problem."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from jlserve.errors import (
    DegradedError,
    DeltaFormatError,
    DeltaMismatchError,
    DrainTimeoutError,
    EngineUpdateError,
    JlserveError,
    PreconditionFailedError,
    StateError,
    UnsupportedUpdateError,
    VersionConflictError,
)
from jlserve.server.schemas import ErrorBody, ErrorDetail


class AdminHTTPError(Exception):
    """An admin request refused with `status`; raised by routes and the auth check."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


# Most specific first: a user's bad file is 400, a file that does not fit the model 409.
_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (DeltaFormatError, 400, "invalid_delta"),
    (PreconditionFailedError, 412, "precondition_failed"),
    (VersionConflictError, 409, "version_conflict"),
    (DeltaMismatchError, 409, "delta_mismatch"),
    (UnsupportedUpdateError, 422, "unsupported_update"),
    (DrainTimeoutError, 503, "drain_timeout"),
    (DegradedError, 503, "degraded"),
    (StateError, 500, "state_error"),
    (EngineUpdateError, 500, "engine_error"),
    (JlserveError, 400, "bad_request"),
)


def as_admin_error(exc: Exception) -> AdminHTTPError:
    for cls, status, type_ in _STATUS:
        if isinstance(exc, cls):
            return AdminHTTPError(status, type_, str(exc))
    raise exc


def error_response(exc: AdminHTTPError) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(type=exc.type, message=exc.message))
    return JSONResponse(body.model_dump(), status_code=exc.status)


async def admin_error_handler(_request: Request, exc: AdminHTTPError) -> JSONResponse:
    return error_response(exc)
