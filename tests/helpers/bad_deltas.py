"""A corpus of bad delta files, generated from a good one, with the message each must give.

Shared by the format tests (parse + plan) and the CLI tests (exit code, files unchanged);
the serving tests can post the same bytes to the admin API. Cases named `v2-...` are
format v2 files (gap varints, XOR planes, zstd); the others are format v1 files, which
readers keep accepting.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from safetensors.torch import load, save

from jlserve.delta import SparseDelta, codec, diff_tensors
from jlserve.delta.format import (
    INDEX_SUFFIX,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    NEW_SUFFIX,
    OLD_SUFFIX,
    POSITIONS_TENSOR,
    XOR_TENSOR,
    bits,
)

Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.1.self_attn.v_proj.weight"
OVER_2_48 = [2**24, 2**24 + 1]  # one row more than 2**48 entries


@dataclass(frozen=True)
class BadDelta:
    name: str
    data: bytes
    message: str  # a fragment the one-line error must contain


def good_delta(
    tensors: Mapping[str, torch.Tensor], *, seed: int = 0, version: int = 1
) -> SparseDelta:
    """A valid delta changing a few coordinates of two matrices of the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    target = dict(tensors)
    for name, count in ((Q, 6), (V, 4)):
        flat = tensors[name].reshape(-1).clone()
        idx = torch.randperm(flat.numel(), generator=gen)[:count]
        flat[idx] += torch.randn(count, generator=gen).to(flat.dtype)
        target[name] = flat.view(tensors[name].shape)
    return diff_tensors(tensors, target, task="good", version=version)


def _split(delta: SparseDelta, format_version: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata (as a dict) of `delta` written uncompressed."""
    data = delta.to_bytes(format_version, "none")
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return load(data), json.loads(header["__metadata__"][METADATA_KEY])


def _save(tensors: dict[str, torch.Tensor], meta: dict | str | None) -> bytes:
    if meta is None:
        return save(tensors)
    return save(
        tensors, metadata={METADATA_KEY: meta if isinstance(meta, str) else json.dumps(meta)}
    )


def _edit(delta: SparseDelta, edit: Callable[[dict, dict], None]) -> bytes:
    tensors, meta = _split(delta)
    edit(tensors, meta)
    return _save(tensors, meta)


def _set(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict, dict], None]:
    def edit(tensors: dict, meta: dict) -> None:
        tensors[key] = fn(tensors[key].clone())

    return edit


def _with(t: torch.Tensor, pos: int, value: float) -> torch.Tensor:
    t[pos] = value
    return t


def format_errors(delta: SparseDelta) -> list[BadDelta]:
    """Bad files detectable without a model."""
    good = delta.to_bytes()
    (header_len,) = struct.unpack("<Q", good[:8])
    not_json = b"{this is not json at all}"

    def meta_edit(fn: Callable[[dict], None]) -> Callable[[dict, dict], None]:
        return lambda tensors, meta: fn(meta)

    def rename_tensor(tensors: dict, meta: dict) -> None:
        tensors["model.extra.weight::index"] = tensors[Q + INDEX_SUFFIX].clone()

    def q_spec(**fields) -> Callable[[dict, dict], None]:
        return meta_edit(lambda m: m["params"][Q].update(fields))

    cases = [
        BadDelta("empty", b"", "empty file"),
        BadDelta("too-short", b"\x01\x02\x03", "shorter than the 8-byte"),
        BadDelta(
            "not-safetensors", struct.pack("<Q", len(not_json)) + not_json, "header is not JSON"
        ),
        BadDelta("random-bytes", bytes(range(256)) * 4, "exceeds"),
        BadDelta("huge-header", struct.pack("<Q", 2**40) + b"{}", "exceeds"),
        BadDelta(
            "header-over-16MiB",
            struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
            f"header of {MAX_HEADER_BYTES + 1} bytes exceeds the {MAX_HEADER_BYTES}-byte limit",
        ),
        BadDelta("header-only", good[: 8 + header_len], "truncated file"),
        BadDelta("truncated", good[: len(good) - 7], "truncated file"),
        BadDelta("no-metadata", _save(_split(delta)[0], None), "no 'jlserve.delta' metadata"),
        BadDelta("metadata-not-json", _save(_split(delta)[0], "{oops"), "bad metadata"),
        BadDelta(
            "wrong-format", _edit(delta, meta_edit(lambda m: m.update(format="x"))), "'format'"
        ),
        BadDelta(
            "wrong-format-version",
            _edit(delta, meta_edit(lambda m: m.update(format_version=3))),
            "'format_version'",
        ),
        BadDelta(
            "missing-parent",
            _edit(delta, meta_edit(lambda m: m.pop("parent_fingerprint"))),
            "'parent_fingerprint'",
        ),
        BadDelta(
            "malformed-fingerprint",
            _edit(delta, meta_edit(lambda m: m.update(child_fingerprint="md5:abc"))),
            "'child_fingerprint'",
        ),
        BadDelta(
            "version-zero", _edit(delta, meta_edit(lambda m: m.update(version=0))), "'version'"
        ),
        # Unknown fields are refused at every level of the metadata (extra="forbid").
        BadDelta(
            "unknown-field",
            _edit(delta, meta_edit(lambda m: m.update(surprise=1))),
            "'surprise': Extra inputs are not permitted",
        ),
        BadDelta(
            "unknown-param-field",
            _edit(delta, q_spec(scale=2)),
            f"'params.{Q}.scale': Extra inputs are not permitted",
        ),
        # `params`: nnz >= 1; a shape has a dimension, no zero one, at most 2**48 entries.
        BadDelta("zero-nnz", _edit(delta, q_spec(nnz=0)), f"'params.{Q}.nnz'"),
        BadDelta("no-dimension", _edit(delta, q_spec(shape=[])), f"'params.{Q}.shape'"),
        BadDelta("zero-dimension", _edit(delta, q_spec(shape=[64, 0])), "shape [64, 0] is empty"),
        BadDelta(
            "shape-over-2-48",
            _edit(delta, q_spec(shape=OVER_2_48)),
            f"shape {OVER_2_48} is empty or has more than 2**48 entries",
        ),
        BadDelta(
            "wrong-value-dtype",
            _edit(delta, _set(Q + NEW_SUFFIX, lambda t: t.float())),
            "new values are float32",
        ),
        BadDelta(
            "float-index", _edit(delta, _set(Q + INDEX_SUFFIX, lambda t: t.float())), "index dtype"
        ),
        BadDelta(
            "length-mismatch", _edit(delta, _set(Q + OLD_SUFFIX, lambda t: t[:-1])), "old has shape"
        ),
        BadDelta(
            "index-not-1d",
            _edit(delta, _set(Q + INDEX_SUFFIX, lambda t: t.reshape(1, -1))),
            "index has shape [1, ",
        ),
        BadDelta(
            "out-of-range-index",
            _edit(delta, _set(Q + INDEX_SUFFIX, lambda t: _with(t, -1, 64 * 64))),
            "out of range",
        ),
        BadDelta(
            "negative-index",
            _edit(delta, _set(Q + INDEX_SUFFIX, lambda t: _with(t, 0, -3))),
            "negative index",
        ),
        BadDelta(
            "duplicate-index",
            _edit(delta, _set(Q + INDEX_SUFFIX, lambda t: _with(t, 1, int(t[0])))),
            "duplicate index",
        ),
        BadDelta(
            "unsorted-index",
            _edit(delta, _set(Q + INDEX_SUFFIX, lambda t: t.flip(0))),
            "not sorted",
        ),
        BadDelta(
            "nan-value",
            _edit(delta, _set(Q + NEW_SUFFIX, lambda t: _with(t, 0, math.nan))),
            "NaN or Inf",
        ),
        BadDelta(
            "inf-value",
            _edit(delta, _set(V + OLD_SUFFIX, lambda t: _with(t, 0, math.inf))),
            "NaN or Inf",
        ),
        BadDelta("undeclared-tensor", _edit(delta, rename_tensor), "not declared"),
        BadDelta(
            "missing-tensor",
            _edit(delta, lambda tensors, meta: tensors.pop(V + OLD_SUFFIX)),
            "is missing",
        ),
    ]
    return cases + v2_format_errors(delta)


def _v2_file(positions: bytes, planes: bytes, meta: dict, **codecs: str) -> bytes:
    """A v2 file from raw sections; the metadata's sizes follow the sections given, and
    `codecs` (positions_codec=..., values_codec=...) names what the stored bytes are."""
    meta = json.loads(json.dumps(meta))
    meta["encoding"].update(positions_bytes=len(positions), values_bytes=len(planes))
    meta["encoding"].update(codecs)
    return _save(
        {POSITIONS_TENSOR: codec.as_tensor(positions), XOR_TENSOR: codec.as_tensor(planes)}, meta
    )


def _v2_parts(delta: SparseDelta) -> tuple[list[np.ndarray], bytes, dict]:
    """Per-parameter gaps (name order), raw XOR planes, metadata of `delta` in v2."""
    tensors, meta = _split(delta, 2)
    gaps = [codec.gaps_of(delta.changes[n].index) for n in sorted(delta.changes)]
    return gaps, bytes(tensors[XOR_TENSOR].numpy()), meta


def _varints(gaps: list[np.ndarray]) -> bytes:
    return b"".join(codec.encode_varints(g) for g in gaps)


def v2_format_errors(delta: SparseDelta) -> list[BadDelta]:
    """Bad v2 files: every field of the new encoding, each alone."""
    gaps, planes, meta = _v2_parts(delta)
    positions = _varints(gaps)
    nnz_q = delta.changes[Q].nnz
    numel_q = delta.changes[Q].numel

    overflow = [g.copy() for g in gaps]
    overflow[0][-1] += numel_q  # Q's last position lands past its end
    short = [gaps[0], gaps[1][:-1]]  # one position fewer than the params declare
    last = codec.encode_varints(gaps[1][-1:])
    overlong = positions[: -len(last)] + last[:-1] + bytes([last[-1] | 0x80, 0x00])
    zero_xor = bytearray(planes)
    zero_xor[0] = zero_xor[nnz_q] = 0  # Q's first coordinate: low and high byte planes
    bomb = codec.compress(bytes(100 * 2**20))  # 100 MiB of zeros in about 3 KiB

    def meta_with(**fields) -> dict:
        return {**meta, **fields}

    def encoding_with(**fields) -> dict:
        return meta_with(encoding={**meta["encoding"], **fields})

    def meta_with_spec(**fields) -> dict:
        return meta_with(params={**meta["params"], Q: {**meta["params"][Q], **fields}})

    return [
        BadDelta(
            "v2-missing-encoding",
            _save(_split(delta, 2)[0], {k: v for k, v in meta.items() if k != "encoding"}),
            "'encoding': required by format_version 2",
        ),
        BadDelta(
            "v1-with-encoding",
            _save(_split(delta)[0], meta_with(format_version=1)),
            "'encoding': not part of format_version 1",
        ),
        BadDelta(
            "v2-unknown-encoding-field",
            _v2_file(positions, planes, encoding_with(level=9)),
            "'encoding.level': Extra inputs are not permitted",
        ),
        BadDelta(
            "v2-zero-nnz",
            _v2_file(positions, planes, meta_with_spec(nnz=0)),
            f"'params.{Q}.nnz'",  # refused as metadata, before any section size is computed
        ),
        BadDelta(
            "v2-shape-over-2-48",
            _v2_file(positions, planes, meta_with_spec(shape=OVER_2_48)),
            f"shape {OVER_2_48} is empty or has more than 2**48 entries",
        ),
        BadDelta(
            "v2-unknown-codec",
            _v2_file(positions, planes, encoding_with(positions_codec="lz4")),
            "'encoding.positions_codec'",
        ),
        BadDelta(
            "v2-missing-section",
            _save({POSITIONS_TENSOR: codec.as_tensor(positions)}, meta),
            f"tensor '{XOR_TENSOR}' declared in the metadata is missing",
        ),
        BadDelta(
            "v2-v1-tensor",
            _save(
                {**_split(delta, 2)[0], Q + INDEX_SUFFIX: delta.changes[Q].index},
                meta,
            ),
            "is not declared",
        ),
        BadDelta(
            "v2-section-dtype",
            _save(
                {
                    POSITIONS_TENSOR: codec.as_tensor(positions),
                    XOR_TENSOR: codec.as_tensor(planes).view(torch.int16),
                },
                meta,
            ),
            "xor section is int16",
        ),
        BadDelta(
            "v2-section-not-1d",
            _save(
                {
                    POSITIONS_TENSOR: codec.as_tensor(positions).reshape(1, -1),
                    XOR_TENSOR: codec.as_tensor(planes),
                },
                meta,
            ),
            "positions section is uint8[1, ",
        ),
        BadDelta(
            "v2-section-size",
            _save(
                {
                    POSITIONS_TENSOR: codec.as_tensor(positions + b"\x00"),
                    XOR_TENSOR: codec.as_tensor(planes),
                },
                meta,
            ),
            "positions section has",
        ),
        BadDelta(
            "v2-xor-size",
            _v2_file(positions, planes[:-2], meta),
            "xor section: metadata says",
        ),
        BadDelta(
            "v2-positions-size",
            _v2_file(positions[:3], planes, meta),
            "decompressed bytes cannot hold",
        ),
        BadDelta(
            "v2-positions-over-9-bytes-each",
            _save(
                {POSITIONS_TENSOR: codec.as_tensor(positions), XOR_TENSOR: codec.as_tensor(planes)},
                encoding_with(positions_bytes=9 * delta.nnz + 1),
            ),
            "decompressed bytes cannot hold",
        ),
        BadDelta(
            "v2-truncated-varint",
            _v2_file(positions[:-1] + bytes([positions[-1] | 0x80]), planes, meta),
            "truncated varint",
        ),
        BadDelta(
            "v2-count-mismatch", _v2_file(_varints(short), planes, meta), "the params declare"
        ),
        BadDelta(
            "v2-extra-varint",
            _v2_file(positions + b"\x00", planes, meta),  # one more than the params declare
            "the params declare",
        ),
        BadDelta("v2-overlong-varint", _v2_file(overlong, planes, meta), "non-canonical varint"),
        BadDelta(
            "v2-varint-too-long",
            _v2_file(positions[: -len(last)] + b"\x80" * 9 + b"\x01", planes, meta),
            "varint of 10 bytes",
        ),
        BadDelta("v2-gap-overflow", _v2_file(_varints(overflow), planes, meta), "gap overflow"),
        BadDelta("v2-zero-xor", _v2_file(positions, bytes(zero_xor), meta), "XOR value 0"),
        BadDelta(
            "v2-decompression-bomb",
            _save(
                {POSITIONS_TENSOR: codec.as_tensor(bomb), XOR_TENSOR: codec.as_tensor(planes)},
                encoding_with(positions_codec="zstd"),
            ),
            f"zstd frame declares {100 * 2**20} bytes, the metadata ",
        ),
        BadDelta(
            "v2-declared-bomb",
            _v2_file(
                positions,
                planes,
                meta_with(
                    params={
                        **meta["params"],
                        "model.huge.weight": {"shape": [2**40], "dtype": "bfloat16", "nnz": 2**31},
                    }
                ),
            ),
            "xor section: metadata says",  # the sizes must follow the params exactly ...
        ),
        BadDelta(
            "v2-sections-over-limit",
            _save(
                {POSITIONS_TENSOR: codec.as_tensor(positions), XOR_TENSOR: codec.as_tensor(planes)},
                {
                    **meta,
                    "params": {
                        **meta["params"],
                        "model.huge.weight": {"shape": [2**40], "dtype": "bfloat16", "nnz": 2**31},
                    },
                    "encoding": {
                        **meta["encoding"],
                        "positions_bytes": 2**31 + 10,
                        "values_bytes": 2 * (2**31 + 10),
                    },
                },
            ),
            "over the limit of",  # ... and are bounded before anything is decompressed
        ),
        BadDelta(
            "v2-zstd-without-size",
            _save(
                {
                    POSITIONS_TENSOR: codec.as_tensor(
                        zstandard.ZstdCompressor(write_content_size=False).compress(positions)
                    ),
                    XOR_TENSOR: codec.as_tensor(planes),
                },
                encoding_with(positions_codec="zstd"),
            ),
            "does not declare its decompressed size",
        ),
        BadDelta(
            "v2-not-zstd",
            _save(
                {POSITIONS_TENSOR: codec.as_tensor(positions), XOR_TENSOR: codec.as_tensor(planes)},
                encoding_with(positions_codec="zstd"),
            ),
            "not a zstd frame",
        ),
        BadDelta(
            "v2-zstd-trailing-bytes",
            _save(
                {
                    POSITIONS_TENSOR: codec.as_tensor(positions),
                    XOR_TENSOR: codec.as_tensor(codec.compress(planes) + b"junk"),
                },
                encoding_with(values_codec="zstd"),
            ),
            "4 bytes after the zstd frame",
        ),
        BadDelta(
            "v2-corrupt-zstd",
            _save(
                {
                    POSITIONS_TENSOR: codec.as_tensor(positions),
                    XOR_TENSOR: codec.as_tensor(_corrupt(codec.compress(planes))),
                },
                encoding_with(values_codec="zstd"),
            ),
            "xor section: ",
        ),
    ]


def _corrupt(frame: bytes) -> bytes:
    """A zstd frame with its header intact and its block data garbled."""
    return frame[:6] + bytes(b ^ 0x5A for b in frame[6:])


def model_errors(delta: SparseDelta) -> list[BadDelta]:
    """Well-formed files that do not fit the model they are applied to."""

    def rename(tensors: dict, meta: dict) -> None:
        new = "model.layers.9.self_attn.q_proj.weight"
        meta["params"][new] = meta["params"].pop(Q)
        for suffix in (INDEX_SUFFIX, OLD_SUFFIX, NEW_SUFFIX):
            tensors[new + suffix] = tensors.pop(Q + suffix)

    def reshape(tensors: dict, meta: dict) -> None:
        meta["params"][Q]["shape"] = [64 * 64]

    def as_float32(tensors: dict, meta: dict) -> None:
        meta["params"][Q]["dtype"] = "float32"
        for suffix in (OLD_SUFFIX, NEW_SUFFIX):
            tensors[Q + suffix] = tensors[Q + suffix].float()

    def set_meta(key: str, value: str) -> Callable[[dict, dict], None]:
        return lambda tensors, meta: meta.update({key: value})

    def nudge_old(tensors: dict, meta: dict) -> None:
        old = tensors[Q + OLD_SUFFIX].clone()
        old[0] = old[0] + 1
        tensors[Q + OLD_SUFFIX] = old

    return [
        BadDelta("unknown-parameter", _edit(delta, rename), "unknown parameter"),
        BadDelta("shape-mismatch", _edit(delta, reshape), "in the model"),
        BadDelta("dtype-mismatch", _edit(delta, as_float32), "is bfloat16 in the model"),
        BadDelta(
            "wrong-parent",
            _edit(delta, set_meta("parent_fingerprint", "sha256:" + "0" * 64)),
            "lineage mismatch",
        ),
        BadDelta(
            "old-values-differ", _edit(delta, nudge_old), "values at the changed coordinates differ"
        ),
        BadDelta(
            "wrong-child",
            _edit(delta, set_meta("child_fingerprint", "sha256:" + "1" * 64)),
            "does not match the delta's declared child",
        ),
        *v2_model_errors(delta),
    ]


def v2_model_errors(delta: SparseDelta) -> list[BadDelta]:
    """Well-formed v2 files that do not fit the model: with no parent values in the file,
    the fingerprints are what catch an XOR applied to the wrong parent."""
    gaps, planes, meta = _v2_parts(delta)
    positions = _varints(gaps)
    nnz_q = delta.changes[Q].nnz
    # The same coordinates, XORed against another parent: one more bit flips in each.
    other_parent = bytes(b ^ 0x01 if i < nnz_q else b for i, b in enumerate(planes))
    # An XOR that turns Q's first value into a NaN (exponent all ones, mantissa non-zero).
    to_nan = bytearray(planes)
    nan_xor = int(bits(delta.changes[Q].old[:1])[0]) ^ 0x7FC0
    to_nan[0], to_nan[nnz_q] = nan_xor & 0xFF, (nan_xor >> 8) & 0xFF
    renamed = {
        "model.layers.0.self_attn.extra_proj.weight" if k == Q else k: v
        for k, v in meta["params"].items()
    }
    return [
        BadDelta(
            "v2-unknown-parameter",
            _v2_file(positions, planes, {**meta, "params": renamed}),
            "unknown parameter",
        ),
        BadDelta(
            "v2-wrong-parent",
            _v2_file(positions, planes, {**meta, "parent_fingerprint": "sha256:" + "0" * 64}),
            "lineage mismatch",
        ),
        BadDelta(
            "v2-xor-wrong-parent",
            _v2_file(positions, other_parent, meta),
            "does not match the delta's declared child",
        ),
        BadDelta("v2-nan-result", _v2_file(positions, bytes(to_nan), meta), "NaN or Inf"),
        BadDelta(
            "v2-wrong-child",
            _v2_file(positions, planes, {**meta, "child_fingerprint": "sha256:" + "1" * 64}),
            "does not match the delta's declared child",
        ),
    ]


def synthetic_tensors() -> dict[str, torch.Tensor]:
    """Two bf16 matrices shaped like the tiny model's, for tests that need no model."""
    gen = torch.Generator().manual_seed(7)
    return {
        Q: torch.randn(64, 64, generator=gen).to(torch.bfloat16),
        V: torch.randn(32, 64, generator=gen).to(torch.bfloat16),
    }


FORMAT_CASES = [c.name for c in format_errors(good_delta(synthetic_tensors()))]
MODEL_CASES = [c.name for c in model_errors(good_delta(synthetic_tensors()))]
