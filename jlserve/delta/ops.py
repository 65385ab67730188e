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
    BITS_DTYPES,
    VALUE_DTYPES,
    DeltaMetadata,
    ParamChange,
    ParamSpec,
    SparseDelta,
    bits,
    dtype_name,
    index_dtype,
)
from jlserve.errors import DeltaMismatchError


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
        if torch.equal(bits(b), bits(t)) if b.dtype in BITS_DTYPES else torch.equal(b, t):
            continue
        if b.dtype not in BITS_DTYPES:
            raise DeltaMismatchError(
                f"{name}: changed, but dtype {dtype_name(b.dtype)} is not supported"
            )
        bits_b, bits_t = bits(b).reshape(-1), bits(t).reshape(-1)
        index = (bits_b != bits_t).nonzero().squeeze(1)  # (nnz,) ascending
        old = bits_b[index]
        changes[name] = ParamChange(
            shape=tuple(b.shape),
            dtype=b.dtype,
            index=index.to(index_dtype(b.numel())),
            xor=old ^ bits_t[index],
            old=old.view(b.dtype),
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
    positions: dict[str, torch.Tensor]  # per touched parameter: (nnz,) int64 flat indices
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
    positions: dict[str, torch.Tensor] = {}
    for name, change in delta.changes.items():
        index = change.index.long()
        positions[name] = index
        flat = tensors[name].reshape(-1)
        before = bits(flat)[index]
        if change.old is not None:  # v1 files (and fresh diffs) also prove it coordinate-wise
            expected = bits(change.old) ^ change.xor if reverse else bits(change.old)
            if not torch.equal(before, expected):
                raise DeltaMismatchError(
                    f"{source}: {name}: values at the changed coordinates differ from the delta's"
                )
        after = before ^ change.xor  # applying and reverting are the same operation
        if not bool(torch.isfinite(after.view(flat.dtype)).all()):
            raise DeltaMismatchError(
                f"{source}: {name}: the delta would write NaN or Inf (not made for this model)"
            )
        updated = flat.clone()
        bits(updated)[index] = after
        changed[name] = updated.view(change.shape)
    new_digests = digests.updated(changed)
    if new_digests.fingerprint != expected_to:
        raise DeltaMismatchError(
            f"{source}: result {new_digests.fingerprint} does not match the delta's declared "
            f"{'parent' if reverse else 'child'} {expected_to}"
        )
    return PlannedUpdate(
        changed=changed,
        positions=positions,
        digests=new_digests,
        fingerprint=new_digests.fingerprint,
    )


def density_report(delta: SparseDelta) -> dict[str, dict[str, float | int]]:
    """Per-parameter nnz, size and density, for `jlserve delta inspect` and metrics."""
    return {
        name: {"nnz": c.nnz, "numel": c.numel, "density": c.nnz / c.numel}
        for name, c in delta.changes.items()
    }
