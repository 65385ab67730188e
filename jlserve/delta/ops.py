"""Make, check and apply sparse deltas on in-memory state dicts.

Nothing here mutates its inputs: `plan_update` (`plan_chain` for several in a row)
validates a delta against a model and returns the new tensors of the touched parameters
plus the resulting fingerprint; the caller commits them (offline: write a checkpoint; server: push them into the engine).
That split is what makes "validate fully, then act, or change nothing" easy to keep.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
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
    return plan_chain(tensors, digests, [(delta, source)], reverse=reverse)


def plan_chain(
    tensors: Mapping[str, torch.Tensor],
    digests: TensorDigests,
    chain: Sequence[tuple[SparseDelta, str]],
    *,
    reverse: bool = False,
) -> PlannedUpdate:
    """Apply (or, with `reverse`, undo) a chain of `(delta, source)` in order, as one
    update; mutates nothing.

    Each delta must continue the previous one (its declared parent is the previous
    child; reversed, its declared child is the previous parent) and the first must fit
    the model. The touched tensors are copied and hashed once for the whole chain, not
    once per delta (a restart replaying 10 deltas of a large model hashes 1x, not 10x):
    the result must be the last delta's declared model, which, the XOR of every step
    being exact, proves every intermediate model too.
    """
    if not chain:
        raise DeltaMismatchError("no delta to apply")
    ends = [_lineage(delta, reverse) for delta, _ in chain]
    for delta, source in chain:
        _check_params(tensors, delta, source)
    current_fp = digests.fingerprint
    first, source = chain[0]
    if current_fp != ends[0][0]:
        role = "child (to revert)" if reverse else "parent"
        raise DeltaMismatchError(
            f"{source}: lineage mismatch: delta {first.metadata.task!r} needs {role} "
            f"{ends[0][0]}, the model is {current_fp}"
        )
    for (delta, source), (expected_from, _), (_, previous_to) in zip(
        chain[1:], ends[1:], ends[:-1], strict=True
    ):
        if expected_from != previous_to:
            raise DeltaMismatchError(
                f"{source}: lineage mismatch: delta {delta.metadata.task!r} does not continue "
                f"the previous one ({expected_from} after {previous_to})"
            )
    changed: dict[str, torch.Tensor] = {}  # private copies, (numel,) flat
    indices: dict[str, list[torch.Tensor]] = {}
    for delta, source in chain:
        for name, change in delta.changes.items():
            if name not in changed:
                changed[name] = tensors[name].reshape(-1).clone()
            _apply_change(changed[name], change, name, reverse, source)
            indices.setdefault(name, []).append(change.index)
    positions = {name: _union(parts) for name, parts in indices.items()}
    shaped = {name: flat.view(tensors[name].shape) for name, flat in changed.items()}
    new_digests = digests.updated(shaped)
    expected_to = ends[-1][1]
    if new_digests.fingerprint != expected_to:
        role = "parent" if reverse else "child"
        raise DeltaMismatchError(
            f"{chain[-1][1]}: result {new_digests.fingerprint} does not match the delta's "
            f"declared {role} {expected_to}"
        )
    return PlannedUpdate(
        changed=shaped,
        positions=positions,
        digests=new_digests,
        fingerprint=new_digests.fingerprint,
    )


def _union(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sorted unique int64 positions of several strictly increasing index lists (one sort;
    `torch.unique` is far slower on CPU)."""
    if len(parts) == 1:
        return parts[0].long()
    merged = torch.sort(torch.cat([p.long() for p in parts])).values
    keep = torch.ones_like(merged, dtype=torch.bool)
    keep[1:] = merged[1:] != merged[:-1]
    return merged[keep]


def _lineage(delta: SparseDelta, reverse: bool) -> tuple[str, str]:
    """(the model a delta applies to, the model it makes) in the given direction."""
    meta = delta.metadata
    if reverse:
        return meta.child_fingerprint, meta.parent_fingerprint
    return meta.parent_fingerprint, meta.child_fingerprint


def _check_params(tensors: Mapping[str, torch.Tensor], delta: SparseDelta, source: str) -> None:
    """Every changed parameter exists in the model with the delta's shape and dtype."""
    for name, change in delta.changes.items():
        current = tensors.get(name)
        if current is None:
            raise DeltaMismatchError(f"{source}: unknown parameter {name!r} (not in the model)")
        if tuple(current.shape) != change.shape:
            raise DeltaMismatchError(
                f"{source}: {name} has shape {list(current.shape)} in the model, "
                f"{list(change.shape)} in the delta"
            )
        if current.dtype != VALUE_DTYPES[delta.metadata.params[name].dtype]:
            raise DeltaMismatchError(
                f"{source}: {name} is {dtype_name(current.dtype)} in the model, "
                f"{delta.metadata.params[name].dtype} in the delta"
            )


def _apply_change(
    flat: torch.Tensor, change: ParamChange, name: str, reverse: bool, source: str
) -> None:
    """XOR one parameter's changed coordinates into `flat` (a private copy), in place."""
    index = change.index.long()
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
    bits(flat)[index] = after


def density_report(delta: SparseDelta) -> dict[str, dict[str, float | int]]:
    """Per-parameter nnz, size and density, for `jlserve delta inspect` and metrics."""
    return {
        name: {"nnz": c.nnz, "numel": c.numel, "density": c.nnz / c.numel}
        for name, c in delta.changes.items()
    }
