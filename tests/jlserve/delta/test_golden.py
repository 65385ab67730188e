"""The golden delta files (`golden/`, made by `make_golden.py`): pinned bytes, metadata,
values and fingerprints, so that any change to what the writer produces or the reader
understands is seen. A change to these bytes is a format change (docs/delta-format.md).

The fingerprints and the v2 sections are also recomputed here from the specification
alone (hashlib, struct, json), without the library's code."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jlserve.checkpoint import TensorDigests, fingerprint, fingerprint_dir, write_checkpoint
from jlserve.delta import parse_delta, plan_update, read_delta, write_delta
from jlserve.delta.format import bits
from tests.jlserve.delta.make_golden import (
    DOWN,
    FILES,
    NORM,
    PARENT,
    K,
    Q,
    as_tensors,
    child_bits,
    golden_delta,
    raw_bytes,
)

GOLDEN_SHA256 = {
    1: "c34c1dd6a058b61eb66dc5fd24b93d3d4843f075f4bae730d6b4c195d3389c0b",
    2: "0b5ae8c947ddb0dd6e70558f36e24e57456428eb3edf7347e03a2875efbf8612",
}
GOLDEN_SIZE = {1: 1692, 2: 1079}
PARENT_FINGERPRINT = "sha256:820c386991490d3dc047db6342f07b27d719a4ada109c882093ff440b80fe5d8"
CHILD_FINGERPRINT = "sha256:dc9b34cefffafcaf49df74be76fa8c1d2ed9d6a24278406340107ccebb9af814"

PARAMS = {
    K: {"shape": [2, 4], "dtype": "float32", "nnz": 3},
    Q: {"shape": [16, 16], "dtype": "bfloat16", "nnz": 4},
    DOWN: {"shape": [3, 5], "dtype": "bfloat16", "nnz": 1},
}
# name -> (flat indices, the parent's bits there, the child's bits there)
VALUES = {
    K: ([2, 3, 5], [0x3F820000, 0x3F830000, 0x3F850000], [0x3F820001, 0x3FC30000, 0xBF850000]),
    Q: ([0, 1, 130, 255], [0x3F80, 0x3F81, 0x4002, 0x407F], [0x3F81, 0x3FC1, 0xC002, 0x407C]),
    DOWN: ([7], [0xBF23], [0xBE23]),
}
# The two v2 sections, byte for byte (both stored uncompressed: codec "none").
POSITIONS = bytes.fromhex("020001000080017c07")  # K, Q, DOWN in name order
XOR_PLANES = bytes.fromhex(
    "010000"
    "000000"
    "004000"
    "000080"  # K (fp32): byte 0 of its 3 XORs, byte 1, 2, 3
    "01400003"
    "00008000"  # Q (bf16): low bytes, high bytes
    "00"
    "01"  # DOWN
)
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def unsigned(t: torch.Tensor) -> list[int]:
    width = 8 * t.element_size()
    return [x & ((1 << width) - 1) for x in t.tolist()]


# ----------------------------------------------------------------------------- (a) bytes


@pytest.mark.parametrize("format_version", [1, 2])
def test_the_committed_files_are_the_pinned_bytes(format_version):
    data = FILES[format_version].read_bytes()
    assert len(data) == GOLDEN_SIZE[format_version]
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256[format_version]


@pytest.mark.parametrize("format_version", [1, 2])
def test_the_writer_reproduces_the_golden_bytes(format_version, tmp_path):
    """Same inputs, same writer, same bytes (`created_at` is the one field the writer
    takes from the clock; the generator pins it)."""
    path = tmp_path / "d.safetensors"
    write_delta(golden_delta(), path, format_version=format_version)
    assert path.read_bytes() == FILES[format_version].read_bytes()


def test_reading_and_rewriting_gives_the_same_bytes():
    v1, v2 = (FILES[v].read_bytes() for v in (1, 2))
    assert parse_delta(v1).to_bytes(1) == v1
    assert parse_delta(v2).to_bytes(2) == v2
    assert parse_delta(v1).to_bytes(2) == v2  # v1 -> v2 needs no model


# ----------------------------------------------------------------------------- (b) reading


@pytest.mark.parametrize("format_version", [1, 2])
def test_reading_gives_the_pinned_metadata(format_version):
    delta = read_delta(FILES[format_version])
    meta = delta.metadata
    assert (meta.format, meta.format_version) == ("jlserve.sparse_delta", format_version)
    assert (meta.task, meta.version, meta.producer) == ("golden", 3, "jlserve")
    assert (meta.created_at, meta.extra) == (
        "2025-01-01T00:00:00+00:00",
        {"method": "golden", "seed": 0},
    )
    assert meta.parent_fingerprint == PARENT_FINGERPRINT
    assert meta.child_fingerprint == CHILD_FINGERPRINT
    assert {name: spec.model_dump() for name, spec in meta.params.items()} == PARAMS
    assert delta.nnz == 8 and {n: c.nnz for n, c in delta.changes.items()} == {K: 3, Q: 4, DOWN: 1}
    if format_version == 1:
        assert meta.encoding is None
    else:
        assert meta.encoding.model_dump() == {
            "positions": "gap-varint",
            "values": "xor-byteplanes",
            "positions_codec": "none",
            "positions_bytes": 9,
            "values_codec": "none",
            "values_bytes": 22,
        }


@pytest.mark.parametrize("format_version", [1, 2])
def test_reading_gives_the_exact_values(format_version):
    delta = read_delta(FILES[format_version])
    assert sorted(delta.changes) == sorted(VALUES)
    for name, (index, parent, child) in VALUES.items():
        change = delta.changes[name]
        assert change.shape == tuple(PARAMS[name]["shape"])
        assert (
            change.dtype
            == {"bfloat16": torch.bfloat16, "float32": torch.float32}[PARAMS[name]["dtype"]]
        )
        assert change.index.dtype == torch.int32 and change.index.tolist() == index
        assert unsigned(change.xor) == [p ^ c for p, c in zip(parent, child, strict=True)]
        if format_version == 1:
            assert unsigned(bits(change.old)) == parent
            assert unsigned(bits(change.new)) == child
        else:
            assert change.old is None  # v2 carries only the XOR


def _sections(data: bytes) -> dict[str, bytes]:
    """Tensor name -> raw data bytes, from the safetensors layout itself."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    return {
        name: body[entry["data_offsets"][0] : entry["data_offsets"][1]]
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _doc_varint(value: int) -> bytes:
    """Unsigned LEB128 as docs/delta-format.md describes it."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_the_v2_sections_follow_the_specification():
    """Positions: per parameter in name order, gaps i_0, i_k - i_(k-1) - 1 as varints;
    values: the little-endian bytes of the XORs as planes (all byte 0s, then byte 1s...)."""
    sections = _sections(FILES[2].read_bytes())
    assert sections == {"jlserve::positions": POSITIONS, "jlserve::xor": XOR_PLANES}
    positions, planes = b"", b""
    for name in sorted(VALUES):
        index, parent, child = VALUES[name]
        gaps = [i - prev - 1 for prev, i in zip([-1, *index[:-1]], index, strict=True)]
        positions += b"".join(_doc_varint(g) for g in gaps)
        width = 4 if PARAMS[name]["dtype"] == "float32" else 2
        xors = [(p ^ c).to_bytes(width, "little") for p, c in zip(parent, child, strict=True)]
        planes += b"".join(bytes(x[b] for x in xors) for b in range(width))
    assert (positions, planes) == (POSITIONS, XOR_PLANES)
    assert len(_doc_varint(128)) == 2 and b"\x80\x01" in POSITIONS  # Q's gap of 128


@pytest.mark.parametrize("format_version", [1, 2])
def test_applying_the_golden_delta_gives_the_child_and_reverting_the_parent(format_version):
    parent, child = as_tensors(PARENT), as_tensors(child_bits())
    delta = read_delta(FILES[format_version])
    forward = plan_update(parent, TensorDigests(parent), delta)
    assert forward.fingerprint == CHILD_FINGERPRINT
    assert sorted(forward.changed) == sorted(VALUES)
    assert all(bits(forward.changed[n]).equal(bits(child[n])) for n in forward.changed)
    back = plan_update(child, TensorDigests(child), delta, reverse=True)
    assert back.fingerprint == PARENT_FINGERPRINT
    assert all(bits(back.changed[n]).equal(bits(parent[n])) for n in back.changed)


# ----------------------------------------------------------------------------- (c) fingerprint


def doc_fingerprint(tensors: dict[str, tuple[str, list[int], bytes]]) -> str:
    """docs/delta-format.md, "Fingerprint", with hashlib only:
    d(P) = sha256(name 0x00 dtype 0x00 str(list(shape)) 0x00 raw bytes), then sha256 of
    the d(P) concatenated in name order, as "sha256:" + hex."""
    combined = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        head = f"{name}\x00{dtype}\x00{list(shape)}\x00".encode()
        combined.update(hashlib.sha256(head + raw).digest())
    return "sha256:" + combined.hexdigest()


def _raw(
    model: dict[str, tuple[str, list[int], list[int]]],
) -> dict[str, tuple[str, list[int], bytes]]:
    return {n: (dtype, shape, raw_bytes(dtype, v)) for n, (dtype, shape, v) in model.items()}


def test_the_documented_fingerprint_is_the_librarys():
    for model, pinned in ((PARENT, PARENT_FINGERPRINT), (child_bits(), CHILD_FINGERPRINT)):
        assert doc_fingerprint(_raw(model)) == pinned
        assert fingerprint(as_tensors(model)) == pinned
    # the unchanged tensor is part of the fingerprint, though not of the delta
    assert NORM not in read_delta(FILES[2]).changes
    without_norm = {n: t for n, t in _raw(PARENT).items() if n != NORM}
    assert doc_fingerprint(without_norm) != PARENT_FINGERPRINT


def _doc_fingerprint_of_files(model_dir: Path, files: list[str]) -> str:
    """The fingerprint from the bytes of the checkpoint's safetensors files."""
    tensors = {}
    for file in files:
        data = (model_dir / file).read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        for name, raw in _sections(data).items():
            entry = header[name]
            tensors[name] = (SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], raw)
    return doc_fingerprint(tensors)


def test_a_checkpoints_fingerprint_covers_its_tensors_and_nothing_else(tmp_path):
    """One `model.safetensors`, or shards named by `model.safetensors.index.json`; config
    and tokenizer files are not part of it."""
    single = tmp_path / "single"
    write_checkpoint(as_tensors(PARENT), single)
    assert _doc_fingerprint_of_files(single, ["model.safetensors"]) == PARENT_FINGERPRINT
    assert fingerprint_dir(single) == PARENT_FINGERPRINT

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = as_tensors(PARENT)
    shards = {
        "model-00001-of-00002.safetensors": [Q, NORM],
        "model-00002-of-00002.safetensors": [K, DOWN],
    }
    for file, names in shards.items():
        save_file({n: tensors[n] for n in names}, str(sharded / file))
    weight_map = {n: file for file, names in shards.items() for n in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text('{"model_type": "llama"}')
    (sharded / "tokenizer.json").write_text("{}")
    assert _doc_fingerprint_of_files(sharded, list(shards)) == PARENT_FINGERPRINT
    assert fingerprint_dir(sharded) == PARENT_FINGERPRINT
