"""The delta file: round trip, size, and every malformed file refused with a clear message."""

from __future__ import annotations

import dataclasses

import pytest

from jlserve.checkpoint import TensorDigests, load_tensors
from jlserve.delta import (
    SparseDelta,
    diff_tensors,
    parse_delta,
    plan_update,
    read_delta,
    write_delta,
)
from jlserve.errors import DeltaFormatError, DeltaMismatchError
from tests.helpers.bad_deltas import (
    FORMAT_CASES,
    MODEL_CASES,
    Q,
    format_errors,
    good_delta,
    model_errors,
    synthetic_tensors,
)


@pytest.fixture(scope="module")
def tensors(tiny_model_dir):
    return load_tensors(tiny_model_dir)


@pytest.fixture(scope="module")
def delta(tensors):
    return good_delta(tensors)


@pytest.mark.parametrize(("format_version", "compression"), [(2, "zstd"), (2, "none"), (1, "none")])
def test_round_trip_preserves_everything(tmp_path, delta, format_version, compression):
    path = tmp_path / "d.safetensors"
    size = write_delta(delta, path, format_version=format_version, compression=compression)
    assert size == path.stat().st_size
    back = read_delta(path)
    assert back.metadata.format_version == format_version
    assert back.metadata.model_dump(exclude={"format_version", "encoding"}) == (
        delta.metadata.model_dump(exclude={"format_version", "encoding"})
    )
    assert back.changes.keys() == delta.changes.keys()
    for name, change in delta.changes.items():
        got = back.changes[name]
        assert got.shape == change.shape and got.dtype == change.dtype
        for a, b in ((got.index, change.index), (got.xor, change.xor)):
            assert a.dtype == b.dtype and a.equal(b)
        if format_version == 1:  # v1 carries the values themselves, v2 only their XOR
            assert got.old.equal(change.old) and got.new.equal(change.new)
        else:
            assert got.old is None


@pytest.fixture(scope="module")
def dense_delta(tensors):
    """Every entry of every projection changed (values + 1): all gaps are 0."""
    target = {
        name: (t + 1).to(t.dtype) if t.dim() == 2 and "proj" in name else t
        for name, t in tensors.items()
    }
    return diff_tensors(tensors, target, task="dense", version=1)


def test_v2_records_its_encoding(delta, dense_delta):
    raw = parse_delta(delta.to_bytes(2, "none")).metadata.encoding
    assert (raw.positions, raw.values) == ("gap-varint", "xor-byteplanes")
    assert (raw.positions_codec, raw.values_codec) == ("none", "none")
    assert raw.values_bytes == 2 * delta.nnz  # bf16 XORs
    # zstd is kept only where it makes a section smaller: not on 10 coordinates ...
    small = parse_delta(delta.to_bytes(2, "zstd")).metadata.encoding
    assert (small.positions_codec, small.values_codec) == ("none", "none")
    # ... but on a large delta (all gaps 0, XOR high bytes mostly alike)
    packed = parse_delta(dense_delta.to_bytes(2, "zstd")).metadata.encoding
    assert (packed.positions_codec, packed.values_codec) == ("zstd", "zstd")
    assert packed.values_bytes == 2 * dense_delta.nnz


def test_a_large_bf16_delta_costs_8_bytes_per_coordinate_in_v1(dense_delta):
    back = parse_delta(dense_delta.to_bytes(1))
    assert back.payload_bytes == 8 * dense_delta.nnz  # int32 index + bf16 old + bf16 new


def test_v2_costs_at_most_3_bytes_per_coordinate_and_zstd_helps(dense_delta):
    raw = parse_delta(dense_delta.to_bytes(2, "none"))
    assert raw.payload_bytes == 3 * dense_delta.nnz  # one-byte gap + bf16 XOR
    packed = dense_delta.to_bytes(2, "zstd")
    assert len(packed) < len(dense_delta.to_bytes(2, "none")) / 2


def test_v2_of_a_v2_file_is_the_same_file(delta):
    data = delta.to_bytes()
    assert parse_delta(data).to_bytes() == data


def test_v1_needs_the_parent_values(delta):
    with pytest.raises(DeltaFormatError, match="cannot write format v1"):
        parse_delta(delta.to_bytes(2)).to_bytes(1)


def test_empty_delta_round_trips_in_both_formats(tensors):
    empty = diff_tensors(tensors, tensors, task="noop", version=1)
    for version in (1, 2):
        back = parse_delta(empty.to_bytes(version))
        assert back.nnz == 0 and back.metadata.format_version == version


def test_overwrite_goes_through_a_temp_file(tmp_path, delta):
    path = tmp_path / "d.safetensors"
    write_delta(delta, path)
    write_delta(delta, path)
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(DeltaFormatError, match="cannot read delta file"):
        read_delta(tmp_path / "nope.safetensors")


def test_size_limit(tmp_path, delta):
    path = tmp_path / "d.safetensors"
    size = write_delta(delta, path)
    with pytest.raises(DeltaFormatError, match="over the limit"):
        read_delta(path, max_bytes=size - 1)
    with pytest.raises(DeltaFormatError, match="over the limit"):
        parse_delta(path.read_bytes(), max_bytes=size - 1)


def test_decompressed_size_counts_against_the_limit(dense_delta):
    """A well-compressed v2 file may not expand past the caller's limit either."""
    data = dense_delta.to_bytes(2, "zstd")
    raw = 3 * dense_delta.nnz
    assert len(data) < raw
    parse_delta(data, max_bytes=raw)
    with pytest.raises(DeltaFormatError, match=f"decompressed sections total {raw} bytes"):
        parse_delta(data, max_bytes=raw - 1)


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_malformed_file_is_refused(name):
    case = {c.name: c for c in format_errors(good_delta(synthetic_tensors()))}[name]
    with pytest.raises(DeltaFormatError) as info:
        parse_delta(case.data, source="upload.safetensors")
    message = str(info.value)
    assert case.message in message
    assert message.startswith("upload.safetensors: ")
    assert "\n" not in message


def test_corpus_covers_the_v2_fields():
    for kind in ("gap-overflow", "truncated-varint", "decompression-bomb", "zero-xor"):
        assert f"v2-{kind}" in FORMAT_CASES
    assert "v2-xor-wrong-parent" in MODEL_CASES


def test_corpus_covers_the_params_rules_and_unknown_fields():
    """docs/delta-format.md: unknown fields are refused (metadata, a `params` entry, v2's
    `encoding`), and `params` has nnz >= 1 and shapes with a dimension, no zero one and at
    most 2**48 entries, in both versions."""
    for kind in ("unknown-field", "unknown-param-field", "v2-unknown-encoding-field"):
        assert kind in FORMAT_CASES
    for kind in ("zero-nnz", "no-dimension", "zero-dimension", "shape-over-2-48"):
        assert kind in FORMAT_CASES
    for kind in ("zero-nnz", "shape-over-2-48"):
        assert f"v2-{kind}" in FORMAT_CASES


@pytest.mark.parametrize("format_version", [1, 2])
def test_a_shape_of_exactly_2_48_entries_is_accepted(format_version):
    """The bound is inclusive: the corpus refuses one row more (`shape-over-2-48`)."""
    delta = good_delta(synthetic_tensors())
    spec = delta.metadata.params[Q]
    at_limit = delta.metadata.model_copy(
        update={
            "params": {
                **delta.metadata.params,
                Q: spec.model_copy(update={"shape": [2**24, 2**24]}),
            }
        }
    )
    changes = {**delta.changes, Q: dataclasses.replace(delta.changes[Q], shape=(2**24, 2**24))}
    data = SparseDelta(metadata=at_limit, changes=changes).to_bytes(format_version, "none")
    back = parse_delta(data)
    assert back.metadata.params[Q].numel == 2**48
    assert back.changes[Q].index.tolist() == delta.changes[Q].index.tolist()


@pytest.mark.parametrize("name", MODEL_CASES)
def test_delta_that_does_not_fit_the_model_is_refused(name, tensors, delta):
    case = {c.name: c for c in model_errors(delta)}[name]
    parsed = parse_delta(case.data)  # well-formed: only the model can tell
    snapshot = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(DeltaMismatchError, match=case.message.replace("'", ".")):
        plan_update(tensors, TensorDigests(tensors), parsed, source="d")
    assert all(snapshot[k].equal(tensors[k]) for k in tensors)
