"""Typed errors for user-facing failures.

Every error a user can cause (bad file, wrong model, bad flag) is a `JlserveError`:
the CLI prints its message on one line and exits non-zero without a traceback, and the
HTTP layer maps it to a 4xx JSON body. Anything else is a bug and keeps its traceback.
"""


class JlserveError(Exception):
    """Base class of every error caused by user input."""


class CheckpointError(JlserveError):
    """A model directory is missing, unreadable or not a safetensors checkpoint."""


class DeltaFormatError(JlserveError):
    """A delta file is malformed: not safetensors, bad metadata, bad indices or values."""


class DeltaMismatchError(JlserveError):
    """A well-formed delta does not fit the model it is applied to (lineage, names, shapes)."""


class UnsupportedUpdateError(JlserveError):
    """A delta touches weights the serving engine cannot update on its apply path."""


class ServeConfigError(JlserveError):
    """`jlserve serve` was given flags that cannot work together (e.g. no admin token)."""


class StateError(JlserveError):
    """A state directory is unreadable or belongs to a different base checkpoint."""


class VersionConflictError(JlserveError):
    """An update or rollback names a version that does not follow the served one."""


class DrainTimeoutError(JlserveError):
    """Admitted requests were still running when the drain deadline passed (nothing changed)."""


class PreconditionFailedError(JlserveError):
    """`If-Match` named a fingerprint other than the served one (compare-and-swap lost)."""


class DegradedError(JlserveError):
    """The server no longer knows which weights the engine holds; it refuses every change."""


class EngineUpdateError(Exception):
    """The engine failed (or timed out) while changing weights. Not a user error: 500."""


class AdminRequestError(JlserveError):
    """The admin API refused a request (the CLI client prints the server's message).
    `status` and `kind` are the HTTP status and the error body's type, when it answered."""

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class ServerUnreachableError(AdminRequestError):
    """No answer from the server (connection refused, timeout): worth retrying, unlike a refusal."""
