"""The v2 encodings on their own: exact inverses, and every malformed stream refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jlserve.delta import codec


def test_varints_round_trip_every_length():
    values = np.array([0, 1, 127, 128, 300, 2**14, 2**21 - 1, 2**35 + 7, 2**63 - 1])
    data = codec.encode_varints(values)
    assert len(data) == 1 + 1 + 1 + 2 + 2 + 3 + 3 + 6 + 9
    back = codec.decode_varints(np.frombuffer(data, dtype=np.uint8), 9)
    assert back.tolist() == values.tolist()


def test_varints_match_the_reference_encoding():
    """LEB128 as protobuf writes it: low group first, high bit = more bytes follow."""
    assert codec.encode_varints(np.array([300])) == bytes([0xAC, 0x02])
    assert codec.encode_varints(np.array([5, 127])) == bytes([5, 127])


@pytest.mark.parametrize("numel", [1, 1000, 2**31 + 5])
def test_gaps_round_trip(numel):
    gen = torch.Generator().manual_seed(numel % 97)
    count = min(numel, 500)
    index = torch.sort(torch.randperm(min(numel, 10**6), generator=gen)[:count]).values
    index = index * (numel // min(numel, 10**6))  # spread over the whole tensor
    gaps = codec.gaps_of(index)
    assert int(gaps.min()) >= 0
    assert codec.index_of(gaps, numel).tolist() == index.tolist()


def test_gap_overflow_is_refused():
    with pytest.raises(codec.CodecError, match="gap overflow"):
        codec.index_of(np.array([3, 0, 5]), 10)  # positions 3, 4, 10 of 10 entries
    with pytest.raises(codec.CodecError, match="gap overflow"):  # would wrap int64
        codec.index_of(np.array([2**62, 2**62, 2**62]), 10)


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (b"\x05\x85", 2, "truncated varint"),
        (b"\x05\x06", 3, "holds 2 values, the params declare 3"),
        (b"\x85\x00", 1, "non-canonical"),
        (b"\x80" * 9 + b"\x01", 1, "varint of 10 bytes"),
        (b"", 1, "holds 0 values"),
    ],
)
def test_bad_varints_are_refused(data, count, message):
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_varints(np.frombuffer(data, dtype=np.uint8), count)


@pytest.mark.parametrize(("dtype", "np_dtype"), [(torch.int16, np.int16), (torch.int32, np.int32)])
def test_byte_planes_round_trip(dtype, np_dtype):
    values = torch.tensor([1, -1, 0x1234, -32768], dtype=dtype)
    planes = codec.to_planes(values)
    assert planes[:4] == bytes([0x01, 0xFF, 0x34, 0x00])  # all low bytes first
    back = codec.from_planes(np.frombuffer(planes, dtype=np.uint8), np_dtype)
    assert back.tolist() == values.tolist()


def test_zstd_is_bounded_by_the_declared_size_before_decompressing():
    frame = codec.compress(bytes(10_000))
    assert codec.decompress(frame, 10_000) == bytes(10_000)
    with pytest.raises(codec.CodecError, match="declares 10000 bytes, the metadata 100"):
        codec.decompress(frame, 100)
    with pytest.raises(codec.CodecError, match="after the zstd frame"):
        codec.decompress(frame + frame, 10_000)
    with pytest.raises(codec.CodecError, match="not a zstd frame"):
        codec.decompress(b"plain bytes", 11)
