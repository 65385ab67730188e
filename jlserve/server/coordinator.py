"""The swap coordinator: the only code that changes which model version is served.

It keeps the source of truth on the host: the HF state dict of the served version (CPU,
checkpoint dtype; the base memory-mapped, private copies only of the tensors the chain
changed) with its per-tensor digests, and the version store. Every change
follows one path, under one lock:

    validate (parse, plan against the host copy)  -> nothing changed yet; errors are 4xx
    save the delta file                            -> not yet part of any version
    hold new requests at the HTTP layer; drain (bounded) or preempt the running ones
    pause the engine -> load weights -> clear prefix cache -> write state.json
    commit host copy, assign the version number    -> resume engine, release requests

Identity is the fingerprint: a delta applies when its parent is the served model, a
delta whose child is already served is answered as done (`applied: false`), and the
server numbers the versions it accepts. If anything fails between pause and commit, the
previous tensors (still on the host) are loaded back, so the engine serves the previous
version exactly. If even that fails, or the engine dies, the coordinator is degraded:
it refuses every change and `/health` fails, so an orchestrator restarts the server,
which then restores the recorded version. Every wait is bounded: the drain by
`drain_timeout_s`, every engine call by the engine's own call timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from jlserve.checkpoint import TensorDigests
from jlserve.delta import PlannedUpdate, SparseDelta, parse_delta, plan_chain, plan_update
from jlserve.digest_cache import base_digests, save_cache
from jlserve.engine.groups import complete_groups, fused_module_key
from jlserve.engine.protocol import ServingEngine, TensorPatch, WeightLayout
from jlserve.errors import (
    DegradedError,
    DrainTimeoutError,
    JlserveError,
    PreconditionFailedError,
    StateError,
    UnsupportedUpdateError,
    VersionConflictError,
)
from jlserve.faults import FaultStep, fault_point
from jlserve.mapped import MappedCheckpoint
from jlserve.server.metrics import SwapMetrics
from jlserve.server.schemas import (
    ApplyResponse,
    RollbackRequest,
    RollbackResponse,
    StatusResponse,
    Timings,
    UpdateResponse,
)
from jlserve.store import ChainEntry, VersionStore, utc_now
from jlserve.vocab import ApplyPath, DrainTimeoutAction, SwapPolicy

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

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def drained(self) -> None:
        await self._idle.wait()


@dataclass
class _Plan:
    """A validated change of the host state, ready to be swapped in."""

    changed: dict[str, torch.Tensor]  # full new tensors (host copy)
    digests: TensorDigests
    version: int
    positions: dict[str, torch.Tensor] = field(default_factory=dict)  # changed flat indices
    timings: Timings = field(default_factory=Timings)
    sent_bytes: int = 0  # weight bytes the swap sent to each engine worker

    @classmethod
    def of(cls, update: PlannedUpdate, version: int) -> _Plan:
        return cls(update.changed, update.digests, version, positions=update.positions)


@dataclass(frozen=True)
class SwapSettings:
    """How swaps treat running requests (see docs/serving.md, "Swap policies")."""

    policy: SwapPolicy = SwapPolicy.DRAIN
    drain_timeout_s: float = 30.0
    drain_timeout_action: DrainTimeoutAction = DrainTimeoutAction.REFUSE


class SwapCoordinator:
    def __init__(
        self,
        engine: ServingEngine,
        layout: WeightLayout,
        store: VersionStore,
        base: MappedCheckpoint,
        digests: TensorDigests,
        settings: SwapSettings,
        metrics: SwapMetrics,
        max_delta_bytes: int,
    ) -> None:
        self._engine = engine
        self._layout = layout
        self._store = store
        self._base = base
        self._tensors: dict[str, torch.Tensor] = dict(base)  # base views, then touched copies
        self._digests = digests
        self._settings = settings
        self._metrics = metrics
        self.max_delta_bytes = max_delta_bytes
        self._lock = asyncio.Lock()
        self.gate = RequestGate()
        self._last_update: UpdateResponse | None = None
        self._degraded: str | None = None
        self._engine_label: str | None = None
        self._version = 0

    # ------------------------------------------------------------------ startup

    @classmethod
    async def open(
        cls,
        engine: ServingEngine,
        model_dir: Path,
        state_dir: Path,
        settings: SwapSettings,
        metrics: SwapMetrics,
        max_delta_bytes: int,
        rehash_base: bool = False,
    ) -> SwapCoordinator:
        """Map the base checkpoint, open its state dir and bring the engine to the latest
        recorded version (the engine starts on the base checkpoint). Any failure raises:
        the server must not start on a version other than the recorded one.

        The base stays memory-mapped (no private copy); its digests come from the state
        dir's cache for every file unchanged since they were computed."""
        tensors = await asyncio.to_thread(MappedCheckpoint, model_dir)
        digests, report, cache = await asyncio.to_thread(
            base_digests, tensors, state_dir, force=rehash_base
        )
        for file, reason in report.rehashed.items():
            log.info("hashed base weights %s (%s)", file, reason)
        if report.cached:
            log.info("base digests of %d file(s) taken from the digest cache", len(report.cached))
        store = VersionStore.open(state_dir, model_dir, digests.fingerprint)
        if report.rehashed:
            await asyncio.to_thread(save_cache, store.root, cache)
        layout = await engine.weight_layout()
        coordinator = cls(
            engine, layout, store, tensors, digests, settings, metrics, max_delta_bytes
        )
        await coordinator._restore()
        return coordinator

    async def _restore(self) -> None:
        chain = self._store.chain
        if chain:
            start = time.perf_counter()
            try:
                deltas = self._read_chain(chain)
                for delta, source in deltas:
                    self._refuse_unsupported(delta, source)
                update = plan_chain(self._tensors, self._digests, deltas)
            except JlserveError as exc:  # one message saying what is refused, and why
                raise StateError(
                    f"{self._store.root}: cannot restore the recorded model version "
                    f"{chain[-1].version} ({chain[-1].fingerprint}): {exc}; refusing to "
                    "start rather than serve another version"
                ) from None
            replay = _Plan.of(update, chain[-1].version)
            loaded = await self._engine.loaded_fingerprint()
            if loaded == replay.digests.fingerprint:  # the loader applied the chain
                await self._adopt(replay)
                how = "loaded by the engine at start, checked here"
            else:
                await self._swap(replay, commit=None)
                how = "swapped in after the engine loaded the base"
            self._base.release_pages()  # the base pages read to replay: page cache, not us
            if self._degraded:
                raise DegradedError(self._degraded)
            log.info(
                "restored model version %d (%s) from %s: %d deltas, %s, in %.2f s",
                self._version,
                self.fingerprint,
                self._store.root,
                len(chain),
                how,
                time.perf_counter() - start,
            )
        else:
            self._engine_label = await self._engine.label_weights(self._label())
            log.info(
                "serving base model version 0 (%s); state in %s", self.fingerprint, self._store.root
            )
        log.info(
            "weights are applied via the %s path; swap policy %s (drain timeout %.1f s, then %s)",
            self._layout.apply_path,
            self._settings.policy,
            self._settings.drain_timeout_s,
            self._settings.drain_timeout_action,
        )
        self._metrics.version.set(self._version)

    # ------------------------------------------------------------------ queries

    @property
    def version(self) -> int:
        return self._version

    @property
    def fingerprint(self) -> str:
        return self._digests.fingerprint

    @property
    def store_root(self) -> Path:
        return self._store.root

    @property
    def degraded(self) -> str | None:
        """Why the engine's weights are unknown or it cannot serve; None when healthy."""
        return self._degraded or self._engine.dead_reason()

    def version_of(self, fingerprint: str) -> int | None:
        """The version of the served chain whose model is `fingerprint` (None: not in it)."""
        return self._store.version_of(fingerprint)

    def status(self) -> StatusResponse:
        return StatusResponse(
            version=self._version,
            fingerprint=self.fingerprint,
            base=self._store.base,
            chain=self._store.chain,
            history=self._store.history,
            last_update=self._last_update,
            next_version=self._store.next_version,
            swap_policy=self._settings.policy,
            drain_timeout_s=self._settings.drain_timeout_s,
            drain_timeout_action=self._settings.drain_timeout_action,
            apply_path=self._layout.apply_path,
            engine_workers=self._layout.workers,
            swap_in_progress=self._lock.locked(),
            engine_weight_version=self._engine_label,
            degraded=self.degraded,
        )

    # ------------------------------------------------------------------ operations

    async def apply_delta(
        self, data: bytes, source: str, if_match: str | None = None
    ) -> ApplyResponse:
        """Validate `data` (a delta file) and make its child the served version."""
        return await _shielded(self._apply_delta(data, source, if_match))

    async def rollback(
        self, request: RollbackRequest, if_match: str | None = None
    ) -> RollbackResponse:
        """Serve exactly the weights of an earlier version of the current chain."""
        return await _shielded(self._rollback(request, if_match))

    def _check_usable(self, if_match: str | None, expected_parent: str | None = None) -> None:
        """Refuse any change while degraded, or when `If-Match` names another model.

        `expected_parent` is the model the request itself expects; a re-send whose
        If-Match names it is let through so it can be answered as already applied.
        """
        reason = self.degraded
        if reason:
            raise DegradedError(f"server degraded, updates refused: {reason}")
        if if_match is not None and if_match not in (self.fingerprint, expected_parent):
            raise PreconditionFailedError(
                f"If-Match {if_match} is not the served model {self.fingerprint} "
                f"(version {self._version}); nothing changed"
            )

    async def _apply_delta(self, data: bytes, source: str, if_match: str | None) -> ApplyResponse:
        started = time.perf_counter()
        try:
            delta = await asyncio.to_thread(
                parse_delta, data, source=source, max_bytes=self.max_delta_bytes
            )
            parsed = time.perf_counter()
            meta = delta.metadata
            async with self._lock:
                self._check_usable(if_match, expected_parent=meta.parent_fingerprint)
                previous, previous_fp = self._version, self.fingerprint
                if meta.child_fingerprint == previous_fp:  # a re-send: already served
                    return self._answer_apply(delta, _Plan({}, self._digests, previous), False)
                if if_match is not None and if_match != previous_fp:
                    self._check_usable(if_match)  # its parent, but not served: 412
                plan = await asyncio.to_thread(self._plan_apply, delta, source)
                plan.timings.parse_s = parsed - started
                plan.timings.plan_s = time.perf_counter() - parsed
                t = time.perf_counter()
                file = await asyncio.to_thread(
                    self._store.stage_delta, plan.version, plan.digests.fingerprint, data
                )
                plan.timings.stage_s = time.perf_counter() - t
                entry = ChainEntry(
                    version=plan.version,
                    task=meta.task,
                    fingerprint=plan.digests.fingerprint,
                    parent_fingerprint=previous_fp,
                    file=file,
                    nnz=delta.nnz,
                    applied_at=utc_now(),
                )
                await self._swap(
                    plan, commit=lambda s: self._store.commit_apply(entry, s), started=started
                )
                self._record(plan, previous, previous_fp, "apply")
                return self._answer_apply(delta, plan, True, previous, previous_fp)
        except Exception as exc:
            self._metrics.rejected.labels(reason=type(exc).__name__).inc()
            raise

    def _plan_apply(self, delta: SparseDelta, source: str) -> _Plan:
        self._refuse_unsupported(delta, source)
        update = plan_update(self._tensors, self._digests, delta, source=source)
        return _Plan.of(update, self._store.next_version)

    def _refuse_unsupported(self, delta: SparseDelta, source: str) -> None:
        """Refuse, before anything changes, a delta touching weights that the engine's
        apply path cannot update (vLLM transforms them after loading)."""
        unsupported = self._layout.unsupported_modules
        for name in sorted(delta.changes):
            module = fused_module_key(name, self._layout.fused_modules)
            for prefix, why in unsupported.items():
                if module == prefix or module.startswith(prefix + "."):
                    raise UnsupportedUpdateError(
                        f"{source}: {name} is in {prefix}, which the {self._layout.apply_path} "
                        f"apply path cannot update ({why}); nothing changed"
                    )

    def _answer_apply(
        self,
        delta: SparseDelta,
        plan: _Plan,
        applied: bool,
        previous: int | None = None,
        previous_fp: str | None = None,
    ) -> ApplyResponse:
        response = ApplyResponse(
            applied=applied,
            version=self._version,
            fingerprint=self.fingerprint,
            previous_version=self._version if previous is None else previous,
            previous_fingerprint=previous_fp or self.fingerprint,
            task=delta.metadata.task,
            nnz=delta.nnz,
            delta_version=delta.metadata.version,
            apply_path=self._layout.apply_path,
            swap_policy=self._settings.policy,
            timings=plan.timings,
            sent_bytes=plan.sent_bytes,
        )
        if applied:
            self._last_update = response
        return response

    async def _rollback(self, request: RollbackRequest, if_match: str | None) -> RollbackResponse:
        started = time.perf_counter()
        async with self._lock:
            self._check_usable(if_match)
            to_version = self._target_version(request)
            previous, previous_fp = self._version, self.fingerprint
            plan = _Plan({}, self._digests, previous)
            if to_version != previous:
                plan = await asyncio.to_thread(self._plan_rollback, to_version)
                plan.timings.plan_s = time.perf_counter() - started
                await self._swap(
                    plan,
                    commit=lambda s: self._store.commit_rollback(to_version, s),
                    started=started,
                )
                self._record(plan, previous, previous_fp, "rollback")
            response = RollbackResponse(
                applied=to_version != previous,
                version=self._version,
                fingerprint=self.fingerprint,
                previous_version=previous,
                previous_fingerprint=previous_fp,
                apply_path=self._layout.apply_path,
                swap_policy=self._settings.policy,
                timings=plan.timings,
                sent_bytes=plan.sent_bytes,
            )
            if response.applied:
                self._last_update = response
            return response

    def _target_version(self, request: RollbackRequest) -> int:
        """The chain version a rollback request names; refused when not in the chain."""
        if request.to_fingerprint is not None:
            found = self._store.version_of(request.to_fingerprint)
            if found is None:
                raise VersionConflictError(
                    f"cannot roll back to {request.to_fingerprint}: not a model of the served "
                    f"chain (base or versions {[e.version for e in self._store.chain]})"
                )
            return found
        chain = [0, *(e.version for e in self._store.chain)]
        wanted = request.to_version
        if wanted is None or wanted not in chain:
            raise VersionConflictError(
                f"cannot roll back to version {wanted}: the served chain is "
                f"{chain} (version numbers are never reused)"
            )
        return wanted

    def _plan_rollback(self, to_version: int) -> _Plan:
        undone = [e for e in reversed(self._store.chain) if e.version > to_version]
        update = plan_chain(self._tensors, self._digests, self._read_chain(undone), reverse=True)
        return _Plan.of(update, to_version)

    def _read_chain(self, entries: list[ChainEntry]) -> list[tuple[SparseDelta, str]]:
        """The recorded deltas of `entries`, parsed (and validated as files)."""
        return [
            (
                parse_delta(
                    self._store.read_delta_bytes(entry),
                    source=entry.file,
                    max_bytes=self.max_delta_bytes,
                ),
                entry.file,
            )
            for entry in entries
        ]

    def _record(self, plan: _Plan, previous: int, previous_fp: str, operation: str) -> None:
        self._metrics.update_seconds.labels(operation=operation).observe(plan.timings.total_s)
        log.info(
            "%s: version %d (%s) -> %d (%s) in %.3f s (requests held %.3f s)",
            operation,
            previous,
            previous_fp,
            self._version,
            self.fingerprint,
            plan.timings.total_s,
            plan.timings.paused_s,
        )

    def _label(self) -> str:
        """The engine's weight_version label of the served model."""
        return f"{self._version}:{self.fingerprint}"

    # ------------------------------------------------------------------ the swap

    async def _swap(
        self,
        plan: _Plan,
        commit: Callable[[float], None] | None,
        started: float | None = None,
    ) -> None:
        """Swap the engine to `plan` (caller holds the lock); all or nothing."""
        started = time.perf_counter() if started is None else started
        load_new, load_old = self._engine_writes(plan)
        timings = plan.timings
        held = time.perf_counter()
        self.gate.close()
        paused = False
        try:
            pause_as = await self._drain()
            paused = True  # from here on, resume (even if pausing itself failed midway)
            await self._engine.pause(pause_as)
            t = time.perf_counter()
            timings.wait_s = t - held
            try:
                fault_point(FaultStep.BEFORE_APPLY)
                await load_new()
                await self._engine.reset_prefix_cache()
                timings.apply_s = time.perf_counter() - t
                t = time.perf_counter()
                if commit is not None:
                    await asyncio.to_thread(commit, time.perf_counter() - started)
                timings.commit_s = time.perf_counter() - t
            except BaseException:
                await self._restore_weights(load_old)
                raise
            await self._adopt(plan)
        finally:
            try:
                if paused:
                    await self._resume()
            finally:
                self.gate.open()
                timings.paused_s = time.perf_counter() - held
                timings.total_s = time.perf_counter() - started
                # base pages read to plan this swap stay in the page cache, not in us
                self._base.release_pages()

    async def _adopt(self, plan: _Plan) -> None:
        """Make `plan` the served version on the host (the engine already holds it)."""
        self._tensors.update(plan.changed)
        self._digests = plan.digests
        self._version = plan.version
        self._metrics.version.set(plan.version)
        fault_point(FaultStep.AFTER_COMMIT)
        await self._relabel()

    async def _drain(self) -> SwapPolicy:
        """Wait (bounded) for admitted requests; returns how to pause the engine.

        Under `drain`, requests still running at the deadline make the update fail
        (`refuse`: nothing changed) or are preempted (`preempt`).
        """
        if self._settings.policy is SwapPolicy.PREEMPT:
            return SwapPolicy.PREEMPT
        try:
            await asyncio.wait_for(self.gate.drained(), self._settings.drain_timeout_s)
        except TimeoutError:
            running = self.gate.in_flight
            if self._settings.drain_timeout_action is DrainTimeoutAction.REFUSE:
                raise DrainTimeoutError(
                    f"{running} request(s) still running after the drain timeout of "
                    f"{self._settings.drain_timeout_s:g} s; update refused, nothing changed "
                    "(retry later, or serve with --drain-timeout-action preempt)"
                ) from None
            log.warning(
                "drain timeout (%.1f s): preempting %d running request(s)",
                self._settings.drain_timeout_s,
                running,
            )
            return SwapPolicy.PREEMPT
        return SwapPolicy.DRAIN

    async def _resume(self) -> None:
        """Resume the engine; a failure degrades the server (it is reported there, so the
        swap's own outcome, or its original error, is what the caller gets)."""
        try:
            await self._engine.resume()
        except Exception as exc:
            self._degrade(f"resuming the engine failed: {exc}")

    async def _relabel(self) -> None:
        """Give the engine the new weight_version label; a failure is only logged."""
        try:
            self._engine_label = await self._engine.label_weights(self._label())
        except Exception as exc:
            log.warning("could not set the engine's weight_version: %s", exc)
            self._engine_label = None

    def _engine_writes(
        self, plan: _Plan
    ) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
        """How to write `plan` into the engine, and how to put the served version back.

        In place: only the changed positions travel (sparse patches; the old values at
        the same positions undo them). Reload: the full tensors of every touched (fused)
        module, since vLLM rebuilds a fused module only from all of its shards.
        """
        if self._layout.apply_path is ApplyPath.IN_PLACE:
            positions = sorted(plan.positions.items())
            new = {n: _patch(plan.changed[n], i) for n, i in positions}
            plan.sent_bytes = sum(_nbytes(p.index) + _nbytes(p.values) for p in new.values())

            async def patch_back() -> None:  # gathered only if a swap fails (before commit)
                await self._engine.patch_weights(
                    {n: _patch(self._tensors[n], i) for n, i in positions}
                )

            return partial(self._engine.patch_weights, new), patch_back
        names = complete_groups(plan.changed, self._tensors, self._layout.fused_modules)
        full_new = {n: plan.changed.get(n, self._tensors[n]) for n in sorted(names)}
        full_old = {n: self._tensors[n] for n in sorted(names)}
        plan.sent_bytes = sum(_nbytes(t) for t in full_new.values())
        return partial(self._engine.load_weights, full_new), partial(
            self._engine.load_weights, full_old
        )

    async def _restore_weights(self, load_old: Callable[[], Awaitable[None]]) -> None:
        """Put the previous version's weights back after a failed swap."""
        try:
            fault_point(FaultStep.RESTORE_APPLY)
            await load_old()
            await self._engine.reset_prefix_cache()
        except Exception as exc:  # the engine now holds unknown weights: say so loudly
            self._degrade(
                f"an update failed and restoring version {self._version} failed too: {exc}"
            )
        else:
            log.warning("update failed; version %d restored in the engine", self._version)

    def _degrade(self, reason: str) -> None:
        self._degraded = self._degraded or reason
        log.critical("DEGRADED: %s; /health now fails and updates are refused", reason)


Answer = TypeVar("Answer", bound=UpdateResponse)


async def _shielded(operation: Awaitable[Answer]) -> Answer:
    """Run a swap to completion even if the HTTP request that started it is cancelled
    (a client disconnect must not stop a swap between pause and resume)."""
    return await asyncio.shield(asyncio.ensure_future(operation))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _patch(tensor: torch.Tensor, index: torch.Tensor) -> TensorPatch:
    """`tensor`'s values at the flat positions `index`, as an engine patch."""
    return TensorPatch(shape=tuple(tensor.shape), index=index, values=tensor.reshape(-1)[index])
