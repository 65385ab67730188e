"""The trainer's user-facing error: the CLI prints it on one line and exits 2."""

from jlserve.errors import JlserveError


class TrainerError(JlserveError):
    """Bad config, data, model or run directory."""
