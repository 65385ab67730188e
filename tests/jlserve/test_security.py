"""docs/security.md's size limits, at their edges, without starting vLLM: the default
upload limit (2 GiB) from the command line to the reader, the admin route's 413 on a
declared or streamed body just over its limit, and the 16 MiB cap on a delta's
safetensors header. (tests/jlserve/server/test_bad_input.py checks the same 413s on a
running server, with a small `--max-delta-bytes`.)"""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from starlette.requests import Request

from jlserve.cli import build_parser
from jlserve.delta import parse_delta, read_delta
from jlserve.delta.format import MAX_HEADER_BYTES, POSITIONS_TENSOR, XOR_TENSOR
from jlserve.errors import DeltaFormatError
from jlserve.server.config import ServeConfig
from jlserve.server.errors import AdminHTTPError
from jlserve.server.routes import read_body
from tests.helpers.bad_deltas import good_delta, synthetic_tensors

GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def delta_bytes() -> bytes:
    return good_delta(synthetic_tensors()).to_bytes()


# ----------------------------------------------------------------------- the default: 2 GiB


def test_the_default_upload_limit_is_2_gib():
    """`jlserve serve` without --max-delta-bytes, and the plugin under vLLM's own server
    without JLSERVE_MAX_DELTA_BYTES, both limit uploads to 2 GiB."""
    args = build_parser(["serve"]).parse_args(["serve", "--model", "m"])
    assert args.max_delta_bytes == 2 * GiB
    assert ServeConfig().max_delta_bytes == 2 * GiB
    assert ServeConfig.from_env({}).max_delta_bytes == 2 * GiB
    assert ServeConfig.from_env({"JLSERVE_MAX_DELTA_BYTES": "4096"}).max_delta_bytes == 4096
    flag = build_parser(["serve"]).parse_args(["serve", "--model", "m", "--max-delta-bytes", "9"])
    assert flag.max_delta_bytes == 9


def _declared_sections(total: int) -> bytes:
    """A v2 file whose sections declare `total` decompressed bytes (2**29 bf16
    coordinates) but store none: the reader must refuse it by the numbers alone."""
    nnz = 2**29
    values = 2 * nnz
    meta = {
        "format": "jlserve.sparse_delta",
        "format_version": 2,
        "task": "t",
        "parent_fingerprint": "sha256:" + "0" * 64,
        "child_fingerprint": "sha256:" + "1" * 64,
        "params": {"model.huge.weight": {"shape": [2**40], "dtype": "bfloat16", "nnz": nnz}},
        "encoding": {"positions_bytes": total - values, "values_bytes": values},
    }
    header = {
        "__metadata__": {"jlserve.delta": json.dumps(meta)},
        POSITIONS_TENSOR: {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
        XOR_TENSOR: {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def test_the_reader_defaults_to_2_gib_of_decompressed_sections():
    """`parse_delta` without `max_bytes`: sections of exactly 2 GiB pass the bound (and
    fail later, on the missing bytes); one byte more is refused before anything is read."""
    with pytest.raises(DeltaFormatError, match="positions section has 0 bytes"):
        parse_delta(_declared_sections(2 * GiB))
    with pytest.raises(
        DeltaFormatError, match=f"total {2 * GiB + 1} bytes, over the limit of {2 * GiB}"
    ):
        parse_delta(_declared_sections(2 * GiB + 1))


def test_a_file_at_the_limit_is_read_and_one_byte_over_is_not(tmp_path, delta_bytes):
    path = tmp_path / "d.safetensors"
    path.write_bytes(delta_bytes)
    size = len(delta_bytes)
    assert read_delta(path, max_bytes=size).nnz == parse_delta(delta_bytes, max_bytes=size).nnz
    for refuse in (
        lambda: read_delta(path, max_bytes=size - 1),
        lambda: parse_delta(delta_bytes, max_bytes=size - 1),
    ):
        with pytest.raises(
            DeltaFormatError, match=f"file is {size} bytes, over the limit of {size - 1}"
        ):
            refuse()


# ----------------------------------------------------------------------- the admin route's body


def _request(chunks: list[bytes], declared: int | None) -> tuple[Request, list[int]]:
    """A POST /admin/deltas as the ASGI server hands it over; records each body read."""
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/admin/deltas",
        "headers": headers,
        "query_string": b"",
    }
    pending, reads = list(chunks), []

    async def receive() -> dict:
        reads.append(1)
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    return Request(scope, receive), reads


def _read(
    chunks: list[bytes], declared: int | None, limit: int
) -> tuple[bytes | AdminHTTPError, int]:
    request, reads = _request(chunks, declared)
    try:
        return asyncio.run(read_body(request, limit)), len(reads)
    except AdminHTTPError as exc:
        return exc, len(reads)


def test_a_declared_length_over_the_default_limit_is_refused_unread():
    refused, reads = _read([b"x"], declared=2 * GiB + 1, limit=ServeConfig().max_delta_bytes)
    assert isinstance(refused, AdminHTTPError) and (refused.status, refused.type) == (
        413,
        "too_large",
    )
    assert refused.message == f"delta of {2 * GiB + 1} bytes exceeds the limit of {2 * GiB}"
    assert reads == 0  # the body was never awaited
    body, reads = _read([b"x"], declared=2 * GiB, limit=ServeConfig().max_delta_bytes)
    assert body == b"x" and reads == 1  # exactly the limit is not refused up front


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_of_the_limit_is_read_and_one_byte_more_is_refused(declared):
    limit = 10_000
    chunks = [b"a" * 4096, b"b" * 4096, b"c" * (limit - 8192)]
    body, _ = _read(chunks, limit if declared else None, limit)
    assert body == b"".join(chunks)
    over = [*chunks, b"d", b"never read"]
    refused, reads = _read(over, limit + 1 if declared else None, limit)
    assert isinstance(refused, AdminHTTPError) and refused.status == 413
    if declared:
        assert refused.message == f"delta of {limit + 1} bytes exceeds the limit of {limit}"
        assert reads == 0
    else:  # cut off at the chunk that passes the limit, the rest is never read
        assert refused.message == f"delta exceeds the limit of {limit} bytes"
        assert reads == 4


# ----------------------------------------------------------------------- the 16 MiB header cap


def _with_header_of(data: bytes, size: int) -> bytes:
    """`data` (a safetensors file) with its JSON header padded with spaces to `size` bytes."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + header_len].rstrip(b" ")
    assert len(header) <= size
    return struct.pack("<Q", size) + header + b" " * (size - len(header)) + data[8 + header_len :]


def test_a_header_of_16_mib_is_read_and_one_byte_more_is_refused(delta_bytes):
    assert 16 * MiB == MAX_HEADER_BYTES
    at_cap = _with_header_of(delta_bytes, 16 * MiB)
    assert parse_delta(at_cap).to_bytes() == delta_bytes  # the same delta, padding aside
    over = _with_header_of(delta_bytes, 16 * MiB + 1)
    with pytest.raises(
        DeltaFormatError, match=f"header of {16 * MiB + 1} bytes exceeds the {16 * MiB}-byte limit"
    ):
        parse_delta(over)
