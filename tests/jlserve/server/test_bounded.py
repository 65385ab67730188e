"""Bounded waits and the degraded state, on one real server.

1. Drain timeout: a streaming client that stops reading keeps its request admitted; an
   update past `--drain-timeout` is refused (503 drain_timeout) and nothing changes.
2. Engine call timeout: with `mid_apply:hang` armed, the worker stops answering; the
   swap gives up after `--engine-timeout`, restoring the previous weights times out
   too, so the server is degraded: `/health` answers 503 with the reason (an
   orchestrator restarts it), updates are refused with it, status says why.
A client that times out (here: while the drain waits) sends the delta again and learns
the outcome from the server's fingerprint check.
"""

from __future__ import annotations

import time

import httpx
import pytest

from jlserve.client import AdminClient
from jlserve.errors import AdminRequestError
from jlserve.faults import FAULT_ENV
from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    admin_status,
    greedy,
    stalled_stream,
    start_all,
)

pytestmark = pytest.mark.slow

DRAIN_TIMEOUT_S = 2
ENGINE_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    flags = (
        "--admin-token-file", str(token_file),
        "--drain-timeout", str(DRAIN_TIMEOUT_S),
        "--engine-timeout", str(ENGINE_TIMEOUT_S),
    )  # fmt: skip
    server = ServerProcess(
        delta_chain.base, root / "state", root / "server.log", flags,
        env={FAULT_ENV: "mid_apply:hang"},
    )  # fmt: skip
    start_all([server])
    yield server
    server.kill()


def test_drain_timeout_with_a_stalled_streaming_reader_refuses_the_update(server, delta_chain):
    before, outputs = admin_status(server), greedy(server)
    data = delta_chain.deltas[0].read_bytes()
    reader = stalled_stream(server)
    try:
        time.sleep(1.0)  # let the server fill the socket buffers and block
        # a client that gives up before the server answers sends the delta again, which
        # waits behind the first attempt and is refused by the drain timeout too
        with (
            AdminClient(server.url, ADMIN_TOKEN, timeout_s=0.5) as client,
            pytest.raises(AdminRequestError, match=r"no answer within 0\.5 s; sent again") as err,
        ):
            client.update_bytes(data)
        assert "drain timeout" in str(err.value)
        started = time.monotonic()
        r = httpx.post(
            f"{server.url}/admin/deltas", content=data, headers=admin_headers(), timeout=60
        )
        waited = time.monotonic() - started
    finally:
        reader.close()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "drain_timeout"
    assert "still running after the drain timeout of 2 s" in r.json()["error"]["message"]
    assert DRAIN_TIMEOUT_S <= waited < 30  # bounded, not "until the reader reads"
    after = admin_status(server)
    assert (after["version"], after["fingerprint"], after["chain"]) == (
        before["version"],
        before["fingerprint"],
        before["chain"],
    )
    assert greedy(server) == outputs  # requests held during the attempt were released


def test_a_hung_engine_times_out_and_the_server_degrades(server, delta_chain):
    started = time.monotonic()
    r = httpx.post(
        f"{server.url}/admin/deltas",
        content=delta_chain.deltas[0].read_bytes(),
        headers=admin_headers(),
        timeout=120,
    )
    waited = time.monotonic() - started
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "engine_error"
    assert f"no answer from the engine within {ENGINE_TIMEOUT_S} s" in r.json()["error"]["message"]
    assert waited < 60  # every engine call is bounded (the hang lasts 120 s)
    assert "fault injection: mid_apply:hang" in server.log_tail(400)

    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["error"]["type"] == "degraded"
    st = admin_status(server)
    assert st["degraded"] and "restoring version 0 failed" in st["degraded"]
    assert st["version"] == 0 and st["chain"] == []
    refused = httpx.post(
        f"{server.url}/admin/deltas",
        content=delta_chain.deltas[0].read_bytes(),
        headers=admin_headers(),
        timeout=30,
    )
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "degraded"
    assert st["degraded"] in refused.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers(), timeout=30
    )
    assert r.status_code == 503
