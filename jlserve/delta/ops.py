"""Make, check and apply sparse deltas on in-memory state dicts.

Nothing here mutates its inputs: `plan_update` validates a delta against a model and
returns the new tensors of the touched parameters plus the resulting fingerprint; the
caller commits them (offline: write a checkpoint; server: push them into the engine).
That split is what makes "validate fully, then act, or change nothing" easy to keep.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from jlserve.checkpoint import TensorDigests
from jlserve.delta.format import (
    VALUE_DTYPES,
    DeltaMetadata,
    ParamChange,
    ParamSpec,
    SparseDelta,
    dtype_name,
)
from jlserve.errors import DeltaMismatchError

_BITS_DTYPE = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so comparisons are exact (-0.0 != 0.0, NaN == same NaN)."""
    return t.contiguous().view(_BITS_DTYPE[t.dtype])


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def diff_tensors(
    base: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    task: str,
    version: int | None = None,
    extra: Mapping[str, str | int | float | bool] | None = None,
) -> SparseDelta:
    """The sparse delta taking `base` to `target` (same names, shapes and dtypes).

    `version` is only a label for the producer's bookkeeping: servers identify models
    by fingerprint and number versions themselves."""
    if set(base) != set(target):
        only = sorted(set(base) ^ set(target))
        raise DeltaMismatchError(f"checkpoints have different parameters, e.g. {only[0]!r}")
    changes: dict[str, ParamChange] = {}
    specs: dict[str, ParamSpec] = {}
    for name in sorted(base):
        b, t = base[name], target[name]
        if b.shape != t.shape or b.dtype != t.dtype:
            raise DeltaMismatchError(
                f"{name}: base is {dtype_name(b.dtype)}{list(b.shape)}, "
                f"target is {dtype_name(t.dtype)}{list(t.shape)}"
            )
        if torch.equal(_bits(b), _bits(t)) if b.dtype in _BITS_DTYPE else torch.equal(b, t):
            continue
        if b.dtype not in _BITS_DTYPE:
            raise DeltaMismatchError(
                f"{name}: changed, but dtype {dtype_name(b.dtype)} is not supported"
            )
        flat_b, flat_t = b.reshape(-1), t.reshape(-1)
        index = (_bits(flat_b) != _bits(flat_t)).nonzero().squeeze(1)  # (nnz,) ascending
        changes[name] = ParamChange(
            shape=tuple(b.shape),
            index=index.to(_index_dtype(b.numel())),
            old=flat_b[index].clone(),
            new=flat_t[index].clone(),
        )
        specs[name] = ParamSpec(
            shape=list(b.shape), dtype=dtype_name(b.dtype), nnz=int(index.numel())
        )
    metadata = DeltaMetadata(
        task=task,
        version=version,
        parent_fingerprint=TensorDigests(base).fingerprint,
        child_fingerprint=TensorDigests(target).fingerprint,
        params=specs,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        extra=dict(extra or {}),
    )
    return SparseDelta(metadata=metadata, changes=changes)


@dataclass(frozen=True)
class PlannedUpdate:
    """The outcome of a validated delta, not yet committed anywhere."""

    changed: dict[str, torch.Tensor]  # full new tensors of the touched parameters
    digests: TensorDigests  # per-tensor digests of the model after the update
    fingerprint: str  # == the delta's child (apply) or parent (revert) fingerprint


def plan_update(
    tensors: Mapping[str, torch.Tensor],
    digests: TensorDigests,
    delta: SparseDelta,
    *,
    reverse: bool = False,
    source: str = "delta",
) -> PlannedUpdate:
    """Check `delta` against the model and compute the updated tensors; mutates nothing.

    `reverse=True` undoes the delta (the model must then be the delta's child).
    Raises DeltaMismatchError naming `source` and the problem.
    """
    meta = delta.metadata
    expected_from = meta.child_fingerprint if reverse else meta.parent_fingerprint
    expected_to = meta.parent_fingerprint if reverse else meta.child_fingerprint
    for name, change in delta.changes.items():
        current = tensors.get(name)
        if current is None:
            raise DeltaMismatchError(f"{source}: unknown parameter {name!r} (not in the model)")
        if tuple(current.shape) != change.shape:
            raise DeltaMismatchError(
                f"{source}: {name} has shape {list(current.shape)} in the model, "
                f"{list(change.shape)} in the delta"
            )
        if current.dtype != VALUE_DTYPES[meta.params[name].dtype]:
            raise DeltaMismatchError(
                f"{source}: {name} is {dtype_name(current.dtype)} in the model, "
                f"{meta.params[name].dtype} in the delta"
            )
    current_fp = digests.fingerprint
    if current_fp != expected_from:
        role = "child (to revert)" if reverse else "parent"
        raise DeltaMismatchError(
            f"{source}: lineage mismatch: delta {meta.task!r} needs {role} "
            f"{expected_from}, the model is {current_fp}"
        )
    changed: dict[str, torch.Tensor] = {}
    for name, change in delta.changes.items():
        values_from, values_to = (change.new, change.old) if reverse else (change.old, change.new)
        index = change.index.long()
        flat = tensors[name].reshape(-1)
        if not torch.equal(_bits(flat[index]), _bits(values_from)):
            raise DeltaMismatchError(
                f"{source}: {name}: values at the changed coordinates differ from the delta's"
            )
        updated = flat.clone()
        updated[index] = values_to
        changed[name] = updated.view(change.shape)
    new_digests = digests.updated(changed)
    if new_digests.fingerprint != expected_to:
        raise DeltaMismatchError(
            f"{source}: result {new_digests.fingerprint} does not match the delta's declared "
            f"{'parent' if reverse else 'child'} {expected_to}"
        )
    return PlannedUpdate(changed=changed, digests=new_digests, fingerprint=new_digests.fingerprint)


def density_report(delta: SparseDelta) -> dict[str, dict[str, float | int]]:
    """Per-parameter nnz, size and density, for `jlserve delta inspect` and metrics."""
    return {
        name: {"nnz": c.nnz, "numel": c.numel, "density": c.nnz / c.numel}
        for name, c in delta.changes.items()
    }
