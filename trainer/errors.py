"""The trainer's user-facing error: the CLI prints it on one line and exits 2."""

from jlserve.errors import JlserveError


class TrainerError(JlserveError):
    """Bad config, data, model or run directory."""


class OutOfSyncError(TrainerError):
    """A run's last version is not the model it was expected to continue from (a jobs
    worker's run and the served model disagree)."""
