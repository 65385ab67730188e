"""What the swap coordinator needs from an inference engine, and nothing more.

The coordinator (jlserve.server) owns versions, validation and persistence; the engine
only runs the model. Keeping this surface small is what lets the swap logic be read and
tested on its own, and lets a different engine (or a new vLLM) be adapted in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    # vLLM module name -> why the apply path in use cannot update its weights (vLLM
    # transforms them after loading: fused-MoE re-layout, MLA's derived weights, ...)
    unsupported_modules: Mapping[str, str] = field(default_factory=dict)
    data_parallel_size: int = 1
    workers: int = 1  # worker reports gathered per call: TP ranks x data-parallel engines


@dataclass(frozen=True)
class TensorPatch:
    """New values of one HF tensor at some positions, in checkpoint coordinates.

    `index` holds flat indices into the full checkpoint tensor `shape` (int64, sorted,
    unique); `values` the new values there, in the checkpoint dtype (finite). Every rank
    gets the same patch and writes only what falls into its own shard.
    """

    shape: tuple[int, ...]
    index: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,) checkpoint dtype


class ServingEngine(Protocol):
    """The engine operations a weight swap uses.

    An implementation may:
      - pause and resume scheduling (queued requests wait, none is dropped);
      - overwrite the parameters named in `load_weights` / `patch_weights` on every
        worker, TP rank and data-parallel engine;
      - clear the prefix cache.
    It may not:
      - change any parameter (or position of a patched one) it was not given, or keep a
        reference to the tensors;
      - return from `load_weights` / `patch_weights` before every rank of every engine
        holds the new values, or report success when any given name was not loaded;
      - swallow a failure: any error raises `EngineUpdateError` so the caller can restore
        the previous weights (it still has them) and report the problem;
      - wait without bound: every call gives up with `EngineUpdateError` after the
        engine's call timeout (the engine is then in an unknown state);
      - persist anything (versions and files belong to the coordinator).
    `load_weights`, `patch_weights` and `reset_prefix_cache` are only called while
    paused; `patch_weights` only on the in-place path, `load_weights` only on reload.
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

    async def loaded_fingerprint(self) -> str | None:
        """The model every worker loaded at start when it was not the base (jlserve's
        load format applied the recorded chain); None if any worker did not."""
        ...

    async def patch_weights(self, patches: Mapping[str, TensorPatch]) -> None:
        """Write new values at the given positions of HF tensors (in-place path only)."""
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
