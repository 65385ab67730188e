"""A corpus of bad delta files, generated from a good one, with the message each must give.

Shared by the format tests (parse + plan) and the CLI tests (exit code, files unchanged);
the serving tests can post the same bytes to the admin API.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from jlserve.delta import SparseDelta, diff_tensors
from jlserve.delta.format import INDEX_SUFFIX, METADATA_KEY, NEW_SUFFIX, OLD_SUFFIX

Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.1.self_attn.v_proj.weight"


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


def _split(delta: SparseDelta) -> tuple[dict[str, torch.Tensor], dict]:
    return load(delta.to_bytes()), json.loads(delta.metadata.model_dump_json())


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

    cases = [
        BadDelta("empty", b"", "empty file"),
        BadDelta("too-short", b"\x01\x02\x03", "shorter than the 8-byte"),
        BadDelta(
            "not-safetensors", struct.pack("<Q", len(not_json)) + not_json, "header is not JSON"
        ),
        BadDelta("random-bytes", bytes(range(256)) * 4, "exceeds"),
        BadDelta("huge-header", struct.pack("<Q", 2**40) + b"{}", "exceeds"),
        BadDelta("header-only", good[: 8 + header_len], "truncated file"),
        BadDelta("truncated", good[: len(good) - 7], "truncated file"),
        BadDelta("no-metadata", _save(_split(delta)[0], None), "no 'jlserve.delta' metadata"),
        BadDelta("metadata-not-json", _save(_split(delta)[0], "{oops"), "bad metadata"),
        BadDelta(
            "wrong-format", _edit(delta, meta_edit(lambda m: m.update(format="x"))), "'format'"
        ),
        BadDelta(
            "wrong-format-version",
            _edit(delta, meta_edit(lambda m: m.update(format_version=2))),
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
    return cases


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
