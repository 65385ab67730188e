"""A checkpoint's tensors as read-only memory maps, never copied into private memory.

The server keeps the served model's HF tensors on the host (to plan deltas and to put old
values back after a failed swap). At 70B a private copy would cost 140 GB of RAM, so the
base checkpoint is mapped instead: its pages belong to the page cache, are shared with
any other process mapping the same files, and are dropped from this process
(`release_pages`) after a full read such as hashing. Only tensors that a delta touches
are ever copied (the coordinator keeps their new values privately).

safetensors' own `safe_open` also maps the file, but keeps the map out of reach, so its
pages cannot be released once read; hence this small reader of the documented format:
8-byte little-endian header length, a JSON header (`{name: {dtype, shape, data_offsets}}`,
offsets relative to the end of the header), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from jlserve.errors import CheckpointError
from jlserve.weight_files import weight_files

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def read_header(path: Path) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file and its parsed tensor entries."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header of {length} bytes (not safetensors?)")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: malformed safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not an object)")
    header.pop("__metadata__", None)
    return raw, header


class _MappedFile:
    """One safetensors file mapped read-only, with its tensors as views of the map."""

    def __init__(self, path: Path) -> None:
        raw, header = read_header(path)
        data_start = 8 + len(raw)
        size = path.stat().st_size
        with path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, entry in header.items():
            self.tensors[name] = self._view(path, name, entry, data_start, size)

    def _view(self, path: Path, name: str, entry: dict, data_start: int, size: int) -> torch.Tensor:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: {name}: unsupported or malformed entry {entry}"
            ) from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise CheckpointError(f"{path}: {name}: data offsets {begin}..{end} do not fit")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the map is read-only on purpose: never written
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map, dtype=torch.uint8, count=nbytes, offset=data_start + begin
            )
        return flat.view(dtype).view(shape)

    def release_pages(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)


class MappedCheckpoint(Mapping[str, torch.Tensor]):
    """All weight tensors of a checkpoint by HF name, backed by read-only file maps.

    Reading a tensor faults its pages in from the page cache; writing one is a bug (the
    maps are read-only, so it fails loudly). Keep the object alive while its tensors are
    in use: the tensors reference the maps.
    """

    def __init__(self, model_dir: Path) -> None:
        self.files: dict[str, Path] = {}
        self._mapped: list[_MappedFile] = []
        self._tensors: dict[str, torch.Tensor] = {}
        for path in weight_files(model_dir):
            mapped = _MappedFile(path)
            for name in mapped.tensors:
                if name in self._tensors:
                    raise CheckpointError(f"{path}: tensor {name} also in {self.files[name]}")
                self.files[name] = path
            self._tensors.update(mapped.tensors)
            self._mapped.append(mapped)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def release_pages(self) -> None:
        """Drop every resident page from this process (they stay in the page cache, and
        a later read faults them back in): call after reading the whole model."""
        for mapped in self._mapped:
            mapped.release_pages()
