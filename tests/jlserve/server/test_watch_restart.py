"""`--watch DIR`, the preempt policy, and restart from the state dir."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from tests.helpers.serving import ADMIN_TOKEN, ServerProcess, admin_headers, greedy, start_all
from tests.jlserve.server.test_serving import _streams_during_updates

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    watch = root / "incoming"
    watch.mkdir()
    flags = (
        "--admin-token-file",
        str(token_file),
        "--watch",
        str(watch),
        "--swap-policy",
        "preempt",
    )
    server = ServerProcess(delta_chain.base, root / "state", root / "server.log", flags)
    start_all([server])
    yield server, watch
    server.stop()


def drop(watch_dir, name: str, data: bytes) -> None:
    """Write-then-rename, as the watch directory requires."""
    tmp = watch_dir / f".{name}.partial"
    tmp.write_bytes(data)
    os.replace(tmp, watch_dir / name)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def version(server: ServerProcess) -> int:
    return httpx.get(f"{server.url}/admin/status", headers=admin_headers()).json()["version"]


def test_watch_dir_applies_in_version_order_and_sets_bad_files_aside(setup, delta_chain):
    server, watch = setup
    drop(watch, "b-task2.safetensors", delta_chain.deltas[1].read_bytes())
    drop(watch, "broken.safetensors", b"not a safetensors file at all")
    time.sleep(2.5)  # task2 must wait for task1
    assert version(server) == 0
    drop(watch, "c-task1.safetensors", delta_chain.deltas[0].read_bytes())
    wait_for(lambda: version(server) == 2)
    assert sorted(p.name for p in (watch / "applied").iterdir()) == [
        "b-task2.safetensors",
        "c-task1.safetensors",
    ]
    error = (watch / "rejected" / "broken.safetensors.error.txt").read_text()
    assert "broken.safetensors" in error
    assert (watch / "rejected" / "broken.safetensors").exists()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_preempt_policy_serves_every_concurrent_stream(setup, delta_chain):
    server, _watch = setup
    r = httpx.post(f"{server.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers())
    assert r.status_code == 200, r.text
    results = asyncio.run(_streams_during_updates(server, delta_chain.deltas))
    assert [s for s, _v, _t in results] == [200] * 16
    assert all(len(text) > 0 for _s, _v, text in results)
    assert version(server) == 3


def test_restart_after_two_updates_serves_version_two(setup, delta_chain):
    server, _watch = setup
    r = httpx.post(f"{server.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers())
    assert r.status_code == 200, r.text
    for delta in delta_chain.deltas[:2]:
        r = httpx.post(
            f"{server.url}/admin/deltas", content=delta.read_bytes(), headers=admin_headers()
        )
        assert r.status_code == 200, r.text
    before = greedy(server)
    assert {x["version"] for x in before} == {"2"}
    server.stop()
    start_all([server])
    assert version(server) == 2
    assert greedy(server) == before
    assert "restored model version 2" in server.log_path.read_text()
