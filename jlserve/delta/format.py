"""The sparse delta file: the contract between the trainer and the server.

One task's update is one `.safetensors` file; docs/delta-format.md is the specification.
For every changed weight matrix it says which flat coordinates change and how; the
header metadata names the format, the task, the version it produces, and the
fingerprints of the model it was made against (parent) and of the model it produces
(child). Two layouts, told apart by `format_version`:

v1 (8 bytes per coordinate in bf16), per HF parameter `P`:

    P::index  int32 (int64 if P has >= 2**31 entries)  (nnz,)  strictly increasing flat indices
    P::old    P's dtype                                 (nnz,)  values before (parent)
    P::new    P's dtype                                 (nnz,)  values after (child)

v2 (about 3 bytes per coordinate in bf16), two uint8 sections for the whole file, params
in name order (`jlserve.delta.codec` has the encodings):

    jlserve::positions  gap varints of every P's indices, optionally one zstd frame
    jlserve::xor        XOR of old and new bit patterns, byte planes, optionally zstd

In memory both are a `ParamChange` (indices + XOR, and the parent values when the file
has them). This module only parses, validates and writes files; `jlserve.delta.ops`
applies them. Validation here needs no model: structure, metadata, dtypes, lengths,
section sizes (bounded before any decompression), index order and range against the
declared shape, finiteness (v1) and non-zero XORs (v2).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from jlserve.checkpoint import atomic_write_bytes
from jlserve.delta import codec
from jlserve.errors import DeltaFormatError
from jlserve.vocab import DEFAULT_MAX_FILE_BYTES, DELTA_FORMAT_VERSION, FINGERPRINT_PATTERN

FORMAT_NAME = "jlserve.sparse_delta"
FORMAT_VERSION = DELTA_FORMAT_VERSION  # what writers produce by default; readers accept 1 and 2
METADATA_KEY = "jlserve.delta"
INDEX_SUFFIX, OLD_SUFFIX, NEW_SUFFIX = "::index", "::old", "::new"  # v1
POSITIONS_TENSOR, XOR_TENSOR = "jlserve::positions", "jlserve::xor"  # v2

MAX_HEADER_BYTES = 16 * 1024**2  # a header this large is an attack or a bug
MAX_PARAM_NUMEL = 2**48  # far above any weight matrix; keeps index arithmetic in int64

Compression = Literal["none", "zstd"]

# Checkpoint dtypes a delta may carry, by their safetensors/metadata names, and the
# integer dtypes of their bit patterns.
VALUE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
BITS_DTYPES: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
}
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so comparisons are exact (-0.0 != 0.0, NaN == same NaN)."""
    return t.contiguous().view(BITS_DTYPES[t.dtype])


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class ParamSpec(BaseModel):
    """What the delta expects of one parameter of the model."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int] = Field(min_length=1)
    dtype: Literal["bfloat16", "float16", "float32"]
    nnz: int = Field(ge=1)

    @field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        if any(d < 1 for d in shape) or math.prod(shape) > MAX_PARAM_NUMEL:
            raise ValueError(f"shape {shape} is empty or has more than 2**48 entries")
        return shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Encoding(BaseModel):
    """How a v2 file stores its two sections (absent in v1 files)."""

    model_config = ConfigDict(extra="forbid")

    positions: Literal["gap-varint"] = "gap-varint"
    values: Literal["xor-byteplanes"] = "xor-byteplanes"
    positions_codec: Compression = "none"
    positions_bytes: int = Field(ge=0, description="decompressed size of the positions")
    values_codec: Compression = "none"
    values_bytes: int = Field(ge=0, description="decompressed size of the XOR planes")


class DeltaMetadata(BaseModel):
    """The header of a delta file (stored as JSON under the `jlserve.delta` key)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["jlserve.sparse_delta"] = FORMAT_NAME
    format_version: Literal[1, 2] = FORMAT_VERSION
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
    encoding: Encoding | None = None  # v2 only: set by the writer, required by readers


@dataclass(frozen=True)
class ParamChange:
    """The changed coordinates of one parameter: flat `index` into `shape`, and per
    coordinate the XOR of the parent's and the child's bit patterns. `old` (the parent's
    values) is known when the change was diffed or read from a v1 file; a v2 file does
    not carry it (the fingerprints prove the parent and the result instead)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    index: torch.Tensor  # (nnz,) int32/int64, strictly increasing
    xor: torch.Tensor  # (nnz,) BITS_DTYPES[dtype], never 0
    old: torch.Tensor | None = None  # (nnz,) dtype

    @property
    def nnz(self) -> int:
        return int(self.index.numel())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def new(self) -> torch.Tensor:
        """The child's values (needs `old`)."""
        if self.old is None:
            raise DeltaFormatError("a v2 delta does not carry values, only their XOR")
        return (bits(self.old) ^ self.xor).view(self.dtype)


@dataclass(frozen=True)
class SparseDelta:
    metadata: DeltaMetadata
    changes: dict[str, ParamChange]
    payload_bytes: int | None = None  # tensor data in the file it was read from

    @property
    def nnz(self) -> int:
        return sum(c.nnz for c in self.changes.values())

    def to_bytes(
        self, format_version: Literal[1, 2] = FORMAT_VERSION, compression: Compression = "zstd"
    ) -> bytes:
        """The file, in v2 (default) or v1. With `compression="zstd"` each v2 section is
        one zstd frame where that makes it smaller, raw otherwise."""
        if format_version == 1:
            return self._to_v1()
        changes = [self.changes[name] for name in sorted(self.changes)]
        positions = b"".join(codec.encode_varints(codec.gaps_of(c.index)) for c in changes)
        planes = b"".join(codec.to_planes(c.xor) for c in changes)
        stored_positions, positions_codec = _maybe_compress(positions, compression)
        stored_planes, values_codec = _maybe_compress(planes, compression)
        encoding = Encoding(
            positions_codec=positions_codec,
            positions_bytes=len(positions),
            values_codec=values_codec,
            values_bytes=len(planes),
        )
        metadata = self.metadata.model_copy(update={"format_version": 2, "encoding": encoding})
        tensors = {
            POSITIONS_TENSOR: codec.as_tensor(stored_positions),
            XOR_TENSOR: codec.as_tensor(stored_planes),
        }
        return save_safetensors_bytes(tensors, metadata={METADATA_KEY: metadata.model_dump_json()})

    def _to_v1(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name, change in self.changes.items():
            if change.old is None:
                raise DeltaFormatError(
                    f"{name}: cannot write format v1 without the parent's values "
                    "(this delta was read from a v2 file)"
                )
            tensors[name + INDEX_SUFFIX] = change.index.contiguous()
            tensors[name + OLD_SUFFIX] = change.old.contiguous()
            tensors[name + NEW_SUFFIX] = change.new.contiguous()
        metadata = self.metadata.model_copy(update={"format_version": 1, "encoding": None})
        header = {METADATA_KEY: metadata.model_dump_json(exclude={"encoding"})}
        return save_safetensors_bytes(tensors, metadata=header)


def _maybe_compress(raw: bytes, compression: Compression) -> tuple[bytes, Compression]:
    if compression == "zstd" and raw:
        packed = codec.compress(raw)
        if len(packed) < len(raw):
            return packed, "zstd"
    return raw, "none"


def write_delta(
    delta: SparseDelta,
    path: Path,
    *,
    format_version: Literal[1, 2] = FORMAT_VERSION,
    compression: Compression = "zstd",
) -> int:
    """Write `delta` atomically to `path`; returns the file size in bytes."""
    data = delta.to_bytes(format_version, compression)
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


Fail = Callable[[str], DeltaFormatError]


def parse_delta(
    data: bytes, *, source: str = "<upload>", max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> SparseDelta:
    """Parse and fully validate delta bytes (v1 or v2); every problem is a one-line
    DeltaFormatError naming `source`.

    `max_bytes` bounds the file and, for v2, the decompressed sections together.
    """

    def fail(problem: str) -> DeltaFormatError:
        return DeltaFormatError(f"{source}: {problem}")

    if not data:
        raise fail("empty file")
    if len(data) > max_bytes:
        raise fail(f"file is {len(data)} bytes, over the limit of {max_bytes}")
    header, header_bytes = _read_header(data, fail)
    metadata = _parse_metadata(header, fail)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise fail(f"not a valid safetensors file ({exc})") from None

    if metadata.format_version == 1:
        expected = {
            name + suffix
            for name in metadata.params
            for suffix in (INDEX_SUFFIX, OLD_SUFFIX, NEW_SUFFIX)
        }
    else:
        expected = {POSITIONS_TENSOR, XOR_TENSOR}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise fail(f"tensor {unexpected[0]!r} is not declared in the metadata")
    missing = sorted(expected - set(tensors))
    if missing:
        raise fail(f"tensor {missing[0]!r} declared in the metadata is missing")

    if metadata.format_version == 1:
        changes = {
            name: _validated_v1_change(name, spec, tensors, fail)
            for name, spec in sorted(metadata.params.items())
        }
    else:
        changes = _v2_changes(metadata.params, metadata.encoding, tensors, max_bytes, fail)
    return SparseDelta(metadata=metadata, changes=changes, payload_bytes=len(data) - header_bytes)


def _read_header(data: bytes, fail: Fail) -> tuple[dict, int]:
    """The safetensors header as JSON, and its size with the 8-byte length prefix."""
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
    return header, 8 + header_len


def _parse_metadata(header: dict, fail: Fail) -> DeltaMetadata:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise fail(f"no '{METADATA_KEY}' metadata: not a jlserve delta")
    try:
        metadata = DeltaMetadata.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "metadata"
        raise fail(f"bad metadata field '{where}': {err['msg']}") from None
    if (metadata.encoding is None) != (metadata.format_version == 1):
        needs = "not part of" if metadata.format_version == 1 else "required by"
        raise fail(
            f"bad metadata field 'encoding': {needs} format_version {metadata.format_version}"
        )
    return metadata


def _validated_v1_change(
    name: str, spec: ParamSpec, tensors: dict[str, torch.Tensor], fail: Fail
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
    return ParamChange(
        shape=tuple(spec.shape), dtype=value_dtype, index=index, xor=bits(old) ^ bits(new), old=old
    )


def _v2_changes(
    params: dict[str, ParamSpec],
    enc: Encoding,
    tensors: dict[str, torch.Tensor],
    max_bytes: int,
    fail: Fail,
) -> dict[str, ParamChange]:
    """Check every size against the params BEFORE decompressing, then decode and split."""
    specs = sorted(params.items())
    nnz = sum(spec.nnz for _, spec in specs)
    widths = [VALUE_DTYPES[spec.dtype].itemsize for _, spec in specs]
    values_bytes = sum(spec.nnz * w for (_, spec), w in zip(specs, widths, strict=True))
    if enc.values_bytes != values_bytes:
        raise fail(
            f"xor section: metadata says {enc.values_bytes} decompressed bytes, "
            f"the params need {values_bytes}"
        )
    if not nnz <= enc.positions_bytes <= codec.MAX_VARINT_BYTES * nnz:
        raise fail(
            f"positions section: {enc.positions_bytes} decompressed bytes cannot hold {nnz} varints"
        )
    if enc.positions_bytes + enc.values_bytes > max_bytes:
        raise fail(
            f"decompressed sections total {enc.positions_bytes + enc.values_bytes} bytes, "
            f"over the limit of {max_bytes}"
        )
    positions = _section(
        tensors[POSITIONS_TENSOR], "positions", enc.positions_codec, enc.positions_bytes, fail
    )
    planes = _section(tensors[XOR_TENSOR], "xor", enc.values_codec, enc.values_bytes, fail)
    try:
        gaps = codec.decode_varints(positions, nnz)
    except codec.CodecError as exc:
        raise fail(f"positions section: {exc}") from None

    changes: dict[str, ParamChange] = {}
    pos_at = plane_at = 0
    for (name, spec), width in zip(specs, widths, strict=True):
        try:
            index = codec.index_of(gaps[pos_at : pos_at + spec.nnz], spec.numel)
        except codec.CodecError as exc:
            raise fail(f"{name}: {exc}") from None
        value_dtype = VALUE_DTYPES[spec.dtype]
        xor = codec.from_planes(planes[plane_at : plane_at + spec.nnz * width], _NP_BITS[width])
        if not xor.all():
            raise fail(f"{name}: XOR value 0 at a listed coordinate (it would not change)")
        changes[name] = ParamChange(
            shape=tuple(spec.shape),
            dtype=value_dtype,
            index=torch.from_numpy(index.astype(_NP_INDEX[index_dtype(spec.numel)])),
            xor=torch.from_numpy(xor),
        )
        pos_at += spec.nnz
        plane_at += spec.nnz * width
    return changes


_NP_BITS = {2: np.int16, 4: np.int32}  # value width -> numpy dtype of its bit pattern
_NP_INDEX = {torch.int32: np.int32, torch.int64: np.int64}


def _section(
    stored: torch.Tensor, role: str, compression: Compression, raw_bytes: int, fail: Fail
) -> np.ndarray:
    """A v2 section's raw bytes as a uint8 array, its size checked (and bounded) first."""
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise fail(
            f"{role} section is {dtype_name(stored.dtype)}{list(stored.shape)}, expected 1-D uint8"
        )
    if compression == "none":
        if stored.numel() != raw_bytes:
            raise fail(f"{role} section has {stored.numel()} bytes, metadata says {raw_bytes}")
        return stored.numpy()
    try:
        raw = codec.decompress(stored.numpy().tobytes(), raw_bytes)
    except codec.CodecError as exc:
        raise fail(f"{role} section: {exc}") from None
    return np.frombuffer(raw, dtype=np.uint8)
