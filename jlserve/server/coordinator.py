"""The swap coordinator: the only code that changes which model version is served.

It keeps the source of truth on the host: the HF state dict of the served version (CPU,
checkpoint dtype) with its per-tensor digests, and the version store. Every change
follows one path, under one lock:

    validate (parse, plan against the host copy)  -> nothing changed yet; errors are 4xx
    save the delta file                            -> not yet part of any version
    hold new requests at the HTTP layer; drain or preempt the running ones
    pause the engine -> load weights -> clear prefix cache -> write state.json
    commit host copy, bump version                 -> resume engine, release requests

If anything fails between pause and commit, the previous tensors (still on the host)
are loaded back, so the engine serves the previous version exactly; resume and the
release of held requests happen in `finally` blocks. Requests are never dropped: they
wait at the gate (or inside vLLM's paused scheduler) and run after the swap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jlserve.checkpoint import TensorDigests, load_tensors
from jlserve.delta import SparseDelta, parse_delta, plan_update
from jlserve.engine.groups import complete_groups
from jlserve.engine.protocol import ApplyPath, ServingEngine, SwapPolicy, WeightLayout
from jlserve.errors import VersionConflictError
from jlserve.faults import FaultStep, fault_point
from jlserve.server.metrics import SwapMetrics
from jlserve.server.schemas import StatusResponse, Timings, UpdateResponse
from jlserve.store import ChainEntry, VersionStore, utc_now

log = logging.getLogger("jlserve.swap")


class RequestGate:
    """Holds inference requests at the HTTP layer while a swap runs.

    `admit` returns the version a request is served by; under the drain policy the swap
    waits for every admitted request to finish, so that version is exact.
    """

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0

    async def admit(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    @property
    def is_closed(self) -> bool:
        return not self._open.is_set()

    async def drained(self) -> None:
        await self._idle.wait()


@dataclass
class _Plan:
    """A validated change of the host state, ready to be swapped in."""

    changed: dict[str, torch.Tensor]
    digests: TensorDigests
    version: int
    timings: Timings = field(default_factory=Timings)


class SwapCoordinator:
    def __init__(
        self,
        engine: ServingEngine,
        layout: WeightLayout,
        store: VersionStore,
        tensors: dict[str, torch.Tensor],
        digests: TensorDigests,
        policy: SwapPolicy,
        metrics: SwapMetrics,
        max_delta_bytes: int,
    ) -> None:
        self._engine = engine
        self._layout = layout
        self._store = store
        self._tensors = tensors
        self._digests = digests
        self._policy = policy
        self._metrics = metrics
        self.max_delta_bytes = max_delta_bytes
        self._lock = asyncio.Lock()
        self.gate = RequestGate()
        self._last_update: UpdateResponse | None = None
        self._degraded: str | None = None
        self._version = 0

    # ------------------------------------------------------------------ startup

    @classmethod
    async def open(
        cls,
        engine: ServingEngine,
        model_dir: Path,
        state_dir: Path,
        policy: SwapPolicy,
        metrics: SwapMetrics,
        max_delta_bytes: int,
    ) -> SwapCoordinator:
        """Load the base checkpoint, open its state dir and bring the engine to the latest
        recorded version (the engine starts on the base checkpoint)."""
        tensors = await asyncio.to_thread(load_tensors, model_dir)
        digests = await asyncio.to_thread(TensorDigests, tensors)
        store = VersionStore.open(state_dir, model_dir, digests.fingerprint)
        layout = await engine.weight_layout()
        coordinator = cls(engine, layout, store, tensors, digests, policy, metrics, max_delta_bytes)
        await coordinator._restore()
        return coordinator

    async def _restore(self) -> None:
        chain = self._store.chain
        if chain:
            start = time.perf_counter()
            overlay: dict[str, torch.Tensor] = {}
            digests = self._digests
            for entry in chain:
                delta = parse_delta(
                    self._store.read_delta_bytes(entry),
                    source=entry.file,
                    max_bytes=self.max_delta_bytes,
                )
                plan = plan_update(
                    _Overlay(overlay, self._tensors), digests, delta, source=entry.file
                )
                overlay.update(plan.changed)
                digests = plan.digests
            await self._swap(_Plan(overlay, digests, chain[-1].version), commit=None)
            log.info(
                "restored model version %d (%s) from %s: %d deltas replayed in %.2f s",
                self._version,
                self.fingerprint,
                self._store.root,
                len(chain),
                time.perf_counter() - start,
            )
        else:
            log.info(
                "serving base model version 0 (%s); state in %s", self.fingerprint, self._store.root
            )
        log.info(
            "weights are applied via the %s path; swap policy %s",
            self._layout.apply_path,
            self._policy,
        )
        self._metrics.version.set(self._version)

    # ------------------------------------------------------------------ queries

    @property
    def version(self) -> int:
        return self._version

    @property
    def fingerprint(self) -> str:
        return self._digests.fingerprint

    def status(self) -> StatusResponse:
        return StatusResponse(
            version=self._version,
            fingerprint=self.fingerprint,
            base=self._store.base,
            chain=self._store.chain,
            history=self._store.history,
            last_update=self._last_update,
            swap_policy=self._policy,
            apply_path=self._layout.apply_path,
            swap_in_progress=self._lock.locked(),
            degraded=self._degraded,
        )

    def chain_fingerprint(self, version: int) -> str | None:
        """The fingerprint the served chain had at `version` (None if never reached)."""
        if version == 0:
            return self._store.base.fingerprint
        return next((e.fingerprint for e in self._store.chain if e.version == version), None)

    # ------------------------------------------------------------------ operations

    async def apply_delta(self, data: bytes, source: str) -> UpdateResponse:
        """Validate `data` (a delta file) and make its child the served version."""
        return await _shielded(self._apply_delta(data, source))

    async def rollback(self, to_version: int) -> UpdateResponse:
        """Serve exactly the weights of an earlier version of the current chain."""
        return await _shielded(self._rollback(to_version))

    async def _apply_delta(self, data: bytes, source: str) -> UpdateResponse:
        started = time.perf_counter()
        try:
            delta = await asyncio.to_thread(
                parse_delta, data, source=source, max_bytes=self.max_delta_bytes
            )
            parsed = time.perf_counter()
            async with self._lock:
                meta = delta.metadata
                if meta.version != self._version + 1:
                    raise VersionConflictError(
                        f"{source}: delta produces version {meta.version} ({meta.task}), but the "
                        f"server is at version {self._version} and accepts only version "
                        f"{self._version + 1} next"
                    )
                plan = await asyncio.to_thread(self._plan_apply, delta, source)
                plan.timings.parse_s = parsed - started
                plan.timings.plan_s = time.perf_counter() - parsed
                t = time.perf_counter()
                file = await asyncio.to_thread(
                    self._store.stage_delta, meta.version, plan.digests.fingerprint, data
                )
                plan.timings.stage_s = time.perf_counter() - t
                entry = ChainEntry(
                    version=meta.version,
                    task=meta.task,
                    fingerprint=plan.digests.fingerprint,
                    file=file,
                    nnz=delta.nnz,
                    applied_at=utc_now(),
                )
                previous = self._version
                await self._swap(
                    plan, commit=lambda s: self._store.commit_apply(entry, s), started=started
                )
        except Exception as exc:
            self._metrics.rejected.labels(reason=type(exc).__name__).inc()
            raise
        return self._record(plan, previous, "apply", task=meta.task, nnz=delta.nnz)

    def _plan_apply(self, delta: SparseDelta, source: str) -> _Plan:
        plan = plan_update(self._tensors, self._digests, delta, source=source)
        return _Plan(plan.changed, plan.digests, delta.metadata.version)

    async def _rollback(self, to_version: int) -> UpdateResponse:
        started = time.perf_counter()
        async with self._lock:
            if not 0 <= to_version <= self._version:
                raise VersionConflictError(
                    f"cannot roll back to version {to_version}: the server is at version "
                    f"{self._version} (choose 0..{self._version})"
                )
            previous = self._version
            plan = await asyncio.to_thread(self._plan_rollback, to_version)
            plan.timings.plan_s = time.perf_counter() - started
            await self._swap(
                plan, commit=lambda s: self._store.commit_rollback(to_version, s), started=started
            )
        return self._record(plan, previous, "rollback")

    def _plan_rollback(self, to_version: int) -> _Plan:
        overlay: dict[str, torch.Tensor] = {}
        digests = self._digests
        for entry in reversed(self._store.chain):
            if entry.version <= to_version:
                break
            delta = parse_delta(
                self._store.read_delta_bytes(entry),
                source=entry.file,
                max_bytes=self.max_delta_bytes,
            )
            plan = plan_update(
                _Overlay(overlay, self._tensors), digests, delta, reverse=True, source=entry.file
            )
            overlay.update(plan.changed)
            digests = plan.digests
        return _Plan(overlay, digests, to_version)

    def _record(
        self,
        plan: _Plan,
        previous: int,
        operation: str,
        task: str | None = None,
        nnz: int | None = None,
    ) -> UpdateResponse:
        self._metrics.update_seconds.labels(operation=operation).observe(plan.timings.total_s)
        self._last_update = UpdateResponse(
            version=self._version,
            previous_version=previous,
            fingerprint=self.fingerprint,
            task=task,
            nnz=nnz,
            apply_path=self._layout.apply_path,
            swap_policy=self._policy,
            timings=plan.timings,
        )
        log.info(
            "%s: version %d -> %d (%s) in %.3f s (requests held %.3f s)",
            operation,
            previous,
            self._version,
            self.fingerprint,
            plan.timings.total_s,
            plan.timings.paused_s,
        )
        return self._last_update

    # ------------------------------------------------------------------ the swap

    async def _swap(
        self,
        plan: _Plan,
        commit: Callable[[float], None] | None,
        started: float | None = None,
    ) -> None:
        """Swap the engine to `plan` (caller holds the lock); all or nothing."""
        started = time.perf_counter() if started is None else started
        names = set(plan.changed)
        if self._layout.apply_path is ApplyPath.RELOAD:
            names = complete_groups(names, self._tensors, self._layout.fused_modules)
        new = {n: plan.changed.get(n, self._tensors[n]) for n in sorted(names)}
        old = {n: self._tensors[n] for n in sorted(names)}
        timings = plan.timings
        held = time.perf_counter()
        self.gate.close()
        try:
            if self._policy is SwapPolicy.DRAIN:
                await self.gate.drained()
            await self._engine.pause(self._policy)
            t = time.perf_counter()
            timings.wait_s = t - held
            try:
                fault_point(FaultStep.BEFORE_APPLY)
                await self._engine.load_weights(new)
                await self._engine.reset_prefix_cache()
                timings.apply_s = time.perf_counter() - t
                t = time.perf_counter()
                if commit is not None:
                    await asyncio.to_thread(commit, time.perf_counter() - started)
                timings.commit_s = time.perf_counter() - t
            except BaseException:
                await self._restore_weights(old)
                raise
            self._tensors.update(plan.changed)
            self._digests = plan.digests
            self._version = plan.version
            self._metrics.version.set(plan.version)
            fault_point(FaultStep.AFTER_COMMIT)
        finally:
            try:
                await self._engine.resume()
            finally:
                self.gate.open()
                timings.paused_s = time.perf_counter() - held
                timings.total_s = time.perf_counter() - started

    async def _restore_weights(self, old: Mapping[str, torch.Tensor]) -> None:
        """Put the previous version's tensors back after a failed swap."""
        try:
            await self._engine.load_weights(old)
            await self._engine.reset_prefix_cache()
        except Exception as exc:  # the engine now holds unknown weights: say so loudly
            self._degraded = (
                f"update failed and restoring version {self._version} failed too: {exc}"
            )
            log.critical(self._degraded)
        else:
            log.warning("update failed; version %d restored in the engine", self._version)


class _Overlay(Mapping[str, torch.Tensor]):
    """`changed` over `base` without copying: the model as a sequence of plans leaves it."""

    def __init__(
        self, changed: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
    ) -> None:
        self._changed = changed
        self._base = base

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._changed[name] if name in self._changed else self._base[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


async def _shielded(operation: Awaitable[UpdateResponse]) -> UpdateResponse:
    """Run a swap to completion even if the HTTP request that started it is cancelled
    (a client disconnect must not stop a swap between pause and resume)."""
    return await asyncio.shield(asyncio.ensure_future(operation))
