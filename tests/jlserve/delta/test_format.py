"""The delta file: round trip, size, and every malformed file refused with a clear message."""

from __future__ import annotations

import pytest

from jlserve.checkpoint import TensorDigests, load_tensors
from jlserve.delta import diff_tensors, parse_delta, plan_update, read_delta, write_delta
from jlserve.errors import DeltaFormatError, DeltaMismatchError
from tests.helpers.bad_deltas import (
    FORMAT_CASES,
    MODEL_CASES,
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


def test_round_trip_preserves_everything(tmp_path, delta):
    path = tmp_path / "d.safetensors"
    size = write_delta(delta, path)
    assert size == path.stat().st_size
    back = read_delta(path)
    assert back.metadata == delta.metadata
    assert back.changes.keys() == delta.changes.keys()
    for name, change in delta.changes.items():
        got = back.changes[name]
        assert got.shape == change.shape
        for a, b in ((got.index, change.index), (got.old, change.old), (got.new, change.new)):
            assert a.dtype == b.dtype and a.equal(b)


def test_a_large_bf16_delta_costs_about_8_bytes_per_coordinate(tmp_path, tensors):
    target = {
        name: (t + 1).to(t.dtype) if t.dim() == 2 and "proj" in name else t
        for name, t in tensors.items()
    }
    delta = diff_tensors(tensors, target, task="dense", version=1)
    assert delta.payload_bytes == 8 * delta.nnz  # int32 index + bf16 old + bf16 new
    size = write_delta(delta, tmp_path / "d.safetensors")
    assert 8 < size / delta.nnz < 8.1  # the header is small beside the data


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


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_malformed_file_is_refused(name):
    case = {c.name: c for c in format_errors(good_delta(synthetic_tensors()))}[name]
    with pytest.raises(DeltaFormatError) as info:
        parse_delta(case.data, source="upload.safetensors")
    message = str(info.value)
    assert case.message in message
    assert message.startswith("upload.safetensors: ")
    assert "\n" not in message


@pytest.mark.parametrize("name", MODEL_CASES)
def test_delta_that_does_not_fit_the_model_is_refused(name, tensors, delta):
    case = {c.name: c for c in model_errors(delta)}[name]
    parsed = parse_delta(case.data)  # well-formed: only the model can tell
    snapshot = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(DeltaMismatchError, match=case.message.replace("'", ".")):
        plan_update(tensors, TensorDigests(tensors), parsed, source="d")
    assert all(snapshot[k].equal(tensors[k]) for k in tensors)
