"""What the swap coordinator needs from an inference engine, and nothing more.

The coordinator (jlserve.server) owns versions, validation and persistence; the engine
only runs the model. Keeping this surface small is what lets the swap logic be read and
tested on its own, and lets a different engine (or a new vLLM) be adapted in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from jlserve.vocab import ApplyPath, SwapPolicy

if TYPE_CHECKING:  # the protocol itself stays importable without torch
    import torch


@dataclass(frozen=True)
class WeightLayout:
    """How the running model stores its weights, as reported by every worker.

    `fused_modules` maps a fused vLLM module name to the HF modules it packs
    (`{"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}`): on the reload path every HF
    tensor of a touched fused module must be sent, or the missing shards are left as
    garbage.
    """

    apply_path: ApplyPath
    fused_modules: Mapping[str, tuple[str, ...]]
    tensor_parallel_size: int


class ServingEngine(Protocol):
    """The engine operations a weight swap uses.

    An implementation may:
      - pause and resume scheduling (queued requests wait, none is dropped);
      - overwrite the parameters named in `load_weights` on every worker / TP rank;
      - clear the prefix cache.
    It may not:
      - change any parameter it was not given, or keep a reference to the tensors;
      - return from `load_weights` before every rank holds the new values;
      - swallow a failure: any error raises `EngineUpdateError` so the caller can restore
        the previous weights (it still has them) and report the problem;
      - wait without bound: every call gives up with `EngineUpdateError` after the
        engine's call timeout (the engine is then in an unknown state);
      - persist anything (versions and files belong to the coordinator).
    `load_weights` and `reset_prefix_cache` are only called while paused.
    """

    async def weight_layout(self) -> WeightLayout:
        """How weights are stored; fixed for the life of the engine."""
        ...

    async def pause(self, policy: SwapPolicy) -> None:
        """Stop scheduling; with DRAIN return once running requests finished."""
        ...

    async def resume(self) -> None:
        """Resume scheduling, including requests that queued during the pause."""
        ...

    async def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write full HF tensors (checkpoint names and dtype, CPU) into the model."""
        ...

    async def reset_prefix_cache(self) -> None:
        """Drop cached KV computed with the previous weights."""
        ...

    async def label_weights(self, label: str) -> str | None:
        """Record `label` as the engine's own weight version (vLLM's `weight_version`,
        which its outputs carry) and return what the engine now reports; None when the
        engine has no such notion."""
        ...

    def dead_reason(self) -> str | None:
        """Why the engine can no longer serve (its core process died), else None."""
        ...
