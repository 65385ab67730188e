"""The sparse delta file: the contract between the trainer and the server.

One task's update is one `.safetensors` file. For every changed weight matrix it holds
the flat indices of the changed coordinates, their previous values and their new
values, in the checkpoint's dtype; the header metadata names the format, the task, the
version it produces, and the fingerprints of the model it was made against (parent)
and of the model it produces (child). docs/delta-format.md is the specification.

Layout of tensors, for an HF parameter `P` (e.g. `model.layers.0.self_attn.q_proj.weight`):

    P::index  int32 (int64 if P has >= 2**31 entries)  (nnz,)  strictly increasing flat indices
    P::old    P's dtype                                 (nnz,)  values before (parent)
    P::new    P's dtype                                 (nnz,)  values after (child)

This module only parses, validates and writes files; `jlserve.delta.ops` applies them.
Validation here needs no model: structure, metadata, dtypes, lengths, index order and
range against the declared shape, finiteness.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from jlserve.checkpoint import atomic_write_bytes
from jlserve.errors import DeltaFormatError
from jlserve.vocab import DEFAULT_MAX_FILE_BYTES, FINGERPRINT_PATTERN

FORMAT_NAME = "jlserve.sparse_delta"
FORMAT_VERSION = 1
METADATA_KEY = "jlserve.delta"
INDEX_SUFFIX, OLD_SUFFIX, NEW_SUFFIX = "::index", "::old", "::new"

MAX_HEADER_BYTES = 16 * 1024**2  # a header this large is an attack or a bug

# Checkpoint dtypes a delta may carry, by their safetensors/metadata names.
VALUE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ParamSpec(BaseModel):
    """What the delta expects of one parameter of the model."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int] = Field(min_length=1)
    dtype: Literal["bfloat16", "float16", "float32"]
    nnz: int = Field(ge=1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class DeltaMetadata(BaseModel):
    """The header of a delta file (stored as JSON under the `jlserve.delta` key)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["jlserve.sparse_delta"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
    task: str = Field(min_length=1, max_length=256)
    # Advisory since serving contract v2: the server assigns version numbers and orders
    # updates by fingerprint; files written before (which always carry it) still load.
    version: int | None = Field(None, ge=1, description="advisory: the producer's version label")
    parent_fingerprint: str = Field(pattern=FINGERPRINT_PATTERN)
    child_fingerprint: str = Field(pattern=FINGERPRINT_PATTERN)
    params: dict[str, ParamSpec]
    producer: str = "jlserve"
    created_at: str | None = None
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)


@dataclass(frozen=True)
class ParamChange:
    """The changed coordinates of one parameter: flat `index` into `shape`, `old` -> `new`."""

    shape: tuple[int, ...]
    index: torch.Tensor  # (nnz,) int32/int64, strictly increasing
    old: torch.Tensor  # (nnz,) parameter dtype
    new: torch.Tensor  # (nnz,) parameter dtype

    @property
    def nnz(self) -> int:
        return int(self.index.numel())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SparseDelta:
    metadata: DeltaMetadata
    changes: dict[str, ParamChange]

    @property
    def nnz(self) -> int:
        return sum(c.nnz for c in self.changes.values())

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data (indices + old + new values), without the header."""
        return sum(
            (c.index.element_size() + c.old.element_size() + c.new.element_size()) * c.nnz
            for c in self.changes.values()
        )

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name, change in self.changes.items():
            tensors[name + INDEX_SUFFIX] = change.index.contiguous()
            tensors[name + OLD_SUFFIX] = change.old.contiguous()
            tensors[name + NEW_SUFFIX] = change.new.contiguous()
        header = {METADATA_KEY: self.metadata.model_dump_json()}
        return save_safetensors_bytes(tensors, metadata=header)


def write_delta(delta: SparseDelta, path: Path) -> int:
    """Write `delta` atomically to `path`; returns the file size in bytes."""
    data = delta.to_bytes()
    atomic_write_bytes(Path(path), data)
    return len(data)


def read_delta(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> SparseDelta:
    """Read and fully validate a delta file (no model needed)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DeltaFormatError(f"{path}: cannot read delta file ({exc.strerror})") from None
    if size > max_bytes:
        raise DeltaFormatError(f"{path}: file is {size} bytes, over the limit of {max_bytes}")
    return parse_delta(path.read_bytes(), source=str(path), max_bytes=max_bytes)


def parse_delta(
    data: bytes, *, source: str = "<upload>", max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> SparseDelta:
    """Parse and fully validate delta bytes; every problem is a one-line DeltaFormatError."""

    def fail(problem: str) -> DeltaFormatError:
        return DeltaFormatError(f"{source}: {problem}")

    if not data:
        raise fail("empty file")
    if len(data) > max_bytes:
        raise fail(f"file is {len(data)} bytes, over the limit of {max_bytes}")
    metadata = _parse_metadata(_read_header(data, fail), fail)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise fail(f"not a valid safetensors file ({exc})") from None

    expected = {
        name + suffix
        for name in metadata.params
        for suffix in (INDEX_SUFFIX, OLD_SUFFIX, NEW_SUFFIX)
    }
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise fail(f"tensor {unexpected[0]!r} is not declared in the metadata")
    missing = sorted(expected - set(tensors))
    if missing:
        raise fail(f"tensor {missing[0]!r} declared in the metadata is missing")

    changes = {
        name: _validated_change(name, spec, tensors, fail)
        for name, spec in sorted(metadata.params.items())
    }
    return SparseDelta(metadata=metadata, changes=changes)


def _read_header(data: bytes, fail) -> dict:
    if len(data) < 8:
        raise fail("truncated file: shorter than the 8-byte safetensors header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise fail(f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > len(data):
        raise fail(f"truncated file: header claims {header_len} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, ValueError):
        raise fail("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise fail("not a safetensors file (header is not a JSON object)")
    try:
        data_end = max(
            (
                int(entry["data_offsets"][1])
                for key, entry in header.items()
                if key != "__metadata__"
            ),
            default=0,
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise fail("not a safetensors file (tensor entries lack data_offsets)") from None
    available = len(data) - 8 - header_len
    if data_end > available:
        raise fail(f"truncated file: tensors need {data_end} data bytes, file has {available}")
    return header


def _parse_metadata(header: dict, fail) -> DeltaMetadata:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise fail(f"no '{METADATA_KEY}' metadata: not a jlserve delta")
    try:
        return DeltaMetadata.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "metadata"
        raise fail(f"bad metadata field '{where}': {err['msg']}") from None


def _validated_change(
    name: str, spec: ParamSpec, tensors: dict[str, torch.Tensor], fail
) -> ParamChange:
    index, old, new = (tensors[name + s] for s in (INDEX_SUFFIX, OLD_SUFFIX, NEW_SUFFIX))
    value_dtype = VALUE_DTYPES[spec.dtype]
    if index.dtype not in INDEX_DTYPES:
        raise fail(f"{name}: index dtype {dtype_name(index.dtype)}, expected int32 or int64")
    for role, values in (("old", old), ("new", new)):
        if values.dtype != value_dtype:
            raise fail(
                f"{name}: {role} values are {dtype_name(values.dtype)}, metadata says {spec.dtype}"
            )
    for role, t in (("index", index), ("old", old), ("new", new)):
        if t.dim() != 1 or t.numel() != spec.nnz:
            raise fail(f"{name}: {role} has shape {list(t.shape)}, expected [{spec.nnz}]")
    idx = index.long()
    if int(idx.min()) < 0:
        raise fail(f"{name}: negative index {int(idx.min())}")
    if int(idx.max()) >= spec.numel:
        raise fail(f"{name}: index {int(idx.max())} out of range for shape {spec.shape}")
    steps = idx[1:] - idx[:-1]
    if spec.nnz > 1 and not bool((steps > 0).all()):
        if bool((steps == 0).any()):
            raise fail(f"{name}: duplicate index {int(idx[1:][steps == 0][0])}")
        raise fail(f"{name}: indices are not sorted ascending")
    for role, values in (("old", old), ("new", new)):
        if not bool(torch.isfinite(values).all()):
            raise fail(f"{name}: {role} values contain NaN or Inf")
    return ParamChange(shape=tuple(spec.shape), index=index, old=old, new=new)
