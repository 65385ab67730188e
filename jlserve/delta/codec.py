"""The byte encodings of delta format v2: gap varints, XOR byte planes, bounded zstd.

Pure functions on tensors and bytes, no file layout (that is `jlserve.delta.format`).
Decoders never trust their input: every malformed stream raises `CodecError` with a
short description, which the format layer prefixes with the file and section. They are
vectorised with numpy (no Python loop over coordinates; single-threaded, so many small
operations do not pay torch's thread synchronisation on a busy machine).

Positions: for strictly increasing flat indices i_0 < i_1 < ..., the gaps are
g_0 = i_0 and g_k = i_k - i_{k-1} - 1 (so adjacent coordinates give 0), each written as
an unsigned LEB128 varint (7 bits per byte, low group first, high bit = more bytes
follow), at most 9 bytes (63 bits), canonical (no trailing zero groups).

Values: the XOR of the parent's and the child's bit patterns, split into byte planes
(all low bytes, then the next byte of every coordinate, ...), because the high bytes
(sign, exponent) rarely change and compress to almost nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

MAX_VARINT_BYTES = 9  # 63 bits: any flat index of a tensor below 2**63 entries
ZSTD_LEVEL = 9


class CodecError(ValueError):
    """A v2 section is malformed (the format layer turns it into a DeltaFormatError)."""


def as_tensor(data: bytes) -> torch.Tensor:
    """`data` as a 1-D uint8 tensor (a copy; empty bytes give an empty tensor)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


# ---------------------------------------------------------------------------- positions


def gaps_of(index: torch.Tensor) -> np.ndarray:
    """Gaps (int64) of strictly increasing flat indices: i_0, then i_k - i_{k-1} - 1."""
    index = index.numpy().astype(np.int64)
    return np.diff(index, prepend=-1) - 1


def index_of(gaps: np.ndarray, numel: int) -> np.ndarray:
    """Flat indices (int64) from gaps, refusing any that run past `numel` entries."""
    if not gaps.size:
        return gaps
    # Bound the sum in float64 first, so the exact int64 cumsum below cannot overflow.
    span = float(gaps.sum(dtype=np.float64)) + gaps.size
    if span > numel * (1 + 1e-9):
        raise CodecError(f"gap overflow: the positions run to about {span:.0f}, past {numel}")
    index = np.cumsum(gaps + 1) - 1
    last = int(index[-1])
    if last >= numel:
        raise CodecError(f"gap overflow: position {last} is past the last entry {numel - 1}")
    return index


def encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of non-negative int64 `values`, concatenated."""
    values = np.asarray(values, dtype=np.int64)
    if not values.size:
        return b""
    if int(values.max()) < 0x80:  # the common case at a few % density: one byte each
        return values.astype(np.uint8).tobytes()
    nbytes = np.ones_like(values)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += (values >> (7 * k)) > 0
    group = np.repeat(np.arange(values.size), nbytes)
    starts = np.cumsum(nbytes) - nbytes
    shift = np.arange(group.size) - starts[group]
    out = (values[group] >> (7 * shift)) & 0x7F
    out |= (shift < nbytes[group] - 1).astype(np.int64) << 7
    return out.astype(np.uint8).tobytes()


def decode_varints(data: np.ndarray, count: int) -> np.ndarray:
    """Exactly `count` canonical varints from uint8 `data` (all of it), as int64."""
    if data.size == 0:
        if count:
            raise CodecError(f"holds 0 values, the params declare {count}")
        return np.zeros(0, dtype=np.int64)
    if data[-1] >= 0x80:
        raise CodecError("truncated varint at the end of the section")
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count:
        raise CodecError(f"holds {ends.size} values, the params declare {count}")
    if ends.size == data.size:  # every varint is one byte
        return data.astype(np.int64)
    lengths = np.diff(ends, prepend=-1)
    longest = int(lengths.max())
    if longest > MAX_VARINT_BYTES:
        raise CodecError(f"varint of {longest} bytes (at most {MAX_VARINT_BYTES})")
    # Accumulate from the terminating (highest) group down; only multi-byte ones loop.
    values = data[ends].astype(np.int64)
    if bool(((values == 0) & (lengths > 1)).any()):
        raise CodecError("non-canonical varint (a zero high group)")
    sel = np.flatnonzero(lengths > 1)
    for k in range(1, longest):
        sel = sel[lengths[sel] > k]
        values[sel] = (values[sel] << 7) | (data[ends[sel] - k] & 0x7F).astype(np.int64)
    return values


# ---------------------------------------------------------------------------- values


def to_planes(bits: torch.Tensor) -> bytes:
    """Byte planes of an integer tensor's little-endian bytes: all byte 0, all byte 1, ..."""
    raw = bits.contiguous().numpy().view(np.uint8).reshape(-1, bits.element_size())
    return raw.T.tobytes()


def from_planes(planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of `to_planes`: uint8 planes (length nnz * width) -> (nnz,) `dtype`."""
    width = np.dtype(dtype).itemsize
    return np.ascontiguousarray(planes.reshape(width, -1).T).view(dtype).reshape(-1)


# ---------------------------------------------------------------------------- zstd


def compress(raw: bytes) -> bytes:
    """One zstd frame that records its decompressed size (readers require it)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw)


def decompress(stored: bytes, raw_bytes: int) -> bytes:
    """Decompress one zstd frame that must hold exactly `raw_bytes` bytes.

    The frame's declared size is read and compared with `raw_bytes` (which the caller
    has already bounded) BEFORE any decompression, so a small file cannot expand into
    an unbounded allocation; trailing bytes after the frame are refused.
    """
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError:
        raise CodecError("not a zstd frame") from None
    if declared < 0 or declared in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise CodecError("zstd frame does not declare its decompressed size")
    if declared != raw_bytes:
        raise CodecError(f"zstd frame declares {declared} bytes, the metadata {raw_bytes}")
    reader = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = reader.decompress(stored)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd data ({exc})") from None
    if not reader.eof or len(out) != raw_bytes:
        raise CodecError(f"zstd frame gave {len(out)} bytes, expected {raw_bytes}")
    if reader.unused_data:
        raise CodecError(f"{len(reader.unused_data)} bytes after the zstd frame")
    return out
