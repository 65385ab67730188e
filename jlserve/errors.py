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
