"""Plain names shared by the delta format, the engine adapter, the server and the client.

No torch and no vLLM here: the admin CLI imports these to read the server's answers.
"""

from __future__ import annotations

from enum import StrEnum

# A model's identity: sha256 over every tensor's name, dtype, shape and bytes.
FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"
DELTA_FORMAT_VERSION = 2  # what delta writers produce by default; readers accept 1 and 2
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3  # delta file limit: far above any sparse delta of a <10B model
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024**2  # a fine-tuning job's training file (OpenAI's limit too)
DEFAULT_LEASE_S = 60.0  # a jobs worker that has not renewed its lease for this long lost the job


class SwapPolicy(StrEnum):
    """How a swap treats requests already running in the engine."""

    DRAIN = "drain"  # let them finish on the old weights first: one version per response
    PREEMPT = "preempt"  # swap at once; running requests are recomputed on the new weights


class DrainTimeoutAction(StrEnum):
    """What a `drain` swap does when admitted requests are still running at the deadline."""

    REFUSE = "refuse"  # refuse the update; nothing changes
    PREEMPT = "preempt"  # swap anyway, preempting what is still running


class ApplyPath(StrEnum):
    """How new weights reach the engine's parameters."""

    IN_PLACE = "in_place"  # dense parameters: copy into their storage (GPU, CUDA graphs kept)
    RELOAD = "reload"  # repacked parameters (CPU oneDNN): vLLM's reload path, full modules
