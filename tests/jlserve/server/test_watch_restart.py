"""`--watch DIR` on a read-only mount, the preempt policy, restart from the state dir,
and (last) a dead engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from jlserve.delta import read_delta
from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    greedy,
    server_processes,
    start_all,
)
from tests.jlserve.server.test_serving import (
    STREAM_PROMPTS,
    _reference_texts,
    _streams_during_updates,
    overlapping,
)

pytestmark = pytest.mark.slow


def _read_only_view(source: Path, view: Path) -> bool:
    """`view` shows `source` through a read-only bind mount, as compose mounts the
    watched folder (needs root; the tests skip otherwise)."""
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(view)], check=False).returncode
    if mounted != 0:
        return False
    ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=False).returncode
    return ro == 0


@pytest.fixture(scope="module")
def setup(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    source, watch = root / "incoming-src", root / "incoming"
    source.mkdir()
    if not _read_only_view(source, watch):
        pytest.skip("cannot make a read-only view of the watched folder here")
    flags = (
        "--admin-token-file", str(token_file), "--watch", str(watch), "--swap-policy", "preempt",
    )  # fmt: skip
    server = ServerProcess(delta_chain.base, root / "state", root / "server.log", flags)
    try:
        start_all([server])
        yield server, source, watch
    finally:
        server.stop()
        subprocess.run(["umount", str(watch)], check=False, capture_output=True)


def drop(source: Path, name: str, data: bytes) -> None:
    """Write-then-rename, as the watch directory requires (into the writable source)."""
    tmp = source / f".{name}.partial"
    tmp.write_bytes(data)
    os.replace(tmp, source / name)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def status(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/admin/status", headers=admin_headers()).json()


def child(path: Path) -> str:
    return read_delta(path).metadata.child_fingerprint


def test_read_only_watch_folder_applies_by_lineage_and_skips_bad_and_stale_files(
    setup, delta_chain
):
    server, source, watch = setup
    with pytest.raises(OSError):  # the server really sees a read-only folder
        (watch / "probe").write_text("x")
    deltas = [d.read_bytes() for d in delta_chain.deltas]
    drop(source, "b-task2.safetensors", deltas[1])
    drop(source, "broken.safetensors", b"not a safetensors file at all")
    (source / "e-link.safetensors").symlink_to(delta_chain.deltas[0])
    time.sleep(2.5)  # task2 waits for its parent
    assert status(server)["version"] == 0
    drop(source, "c-task1.safetensors", deltas[0])
    wait_for(lambda: status(server)["fingerprint"] == child(delta_chain.deltas[1]))
    # a stale file (its parent is long gone) waits and blocks nothing
    drop(source, "a-stale.safetensors", deltas[0])
    drop(source, "d-task3.safetensors", deltas[2])
    wait_for(lambda: status(server)["fingerprint"] == child(delta_chain.deltas[2]))
    assert [e["task"] for e in status(server)["chain"]] == ["task1", "task2", "task3"]

    # nothing in the watched folder was moved or written; the bookkeeping is in the state dir
    assert sorted(p.name for p in watch.iterdir()) == [
        "a-stale.safetensors",
        "b-task2.safetensors",
        "broken.safetensors",
        "c-task1.safetensors",
        "d-task3.safetensors",
        "e-link.safetensors",
    ]
    ledger = json.loads((server.state_dir / "watch.json").read_text())["files"]
    outcomes = {name: record["outcome"] for name, record in ledger.items()}
    assert outcomes == {
        "b-task2.safetensors": "applied",
        "broken.safetensors": "rejected",
        "c-task1.safetensors": "applied",
        "d-task3.safetensors": "applied",
        "e-link.safetensors": "rejected",
    }
    assert "broken.safetensors" in ledger["broken.safetensors"]["message"]
    assert "symlink" in ledger["e-link.safetensors"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    for name in os.listdir(source):  # leave nothing that could fit a later model
        (source / name).unlink()


def test_preempt_policy_serves_every_stream_and_overlaps_versions(setup, delta_chain):
    server, _source, _watch = setup
    # What each model answers alone: a response that ran across a swap (frozen, then
    # resumed on the new weights) matches neither; under drain every response matches the
    # model it was admitted under (test_serving's drain test).
    post = {"to_version": 0}
    assert httpx.post(f"{server.url}/admin/rollback", json=post, headers=admin_headers()).is_success
    expected = {status(server)["fingerprint"]: asyncio.run(_reference_texts(server, 200))}
    for delta in delta_chain.deltas:
        r = httpx.post(
            f"{server.url}/admin/deltas", content=delta.read_bytes(), headers=admin_headers()
        )
        assert r.status_code == 200, r.text
        expected[status(server)["fingerprint"]] = asyncio.run(_reference_texts(server, 200))
    crossed: list = []
    for _ in range(3):  # a fast machine may finish every stream before a swap: retry
        r = httpx.post(f"{server.url}/admin/rollback", json=post, headers=admin_headers())
        assert r.status_code == 200, r.text
        results, swaps = asyncio.run(_streams_during_updates(server, delta_chain.deltas, 200))
        assert [r.status for r in results] == [200] * 16
        assert all(len(r.text) > 0 for r in results)
        assert status(server)["fingerprint"] == child(delta_chain.deltas[2])
        crossed = [
            r
            for i, r in enumerate(results)
            if r.text != expected[r.fingerprint][STREAM_PROMPTS[i % 8]]
        ] + overlapping(results, swaps)
        if crossed:
            break
    assert crossed, "no response ran across a swap in three rounds"


def test_restart_after_two_updates_serves_the_same_model(setup, delta_chain):
    server, _source, _watch = setup
    r = httpx.post(f"{server.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers())
    assert r.status_code == 200, r.text
    for delta in delta_chain.deltas[:2]:
        r = httpx.post(
            f"{server.url}/admin/deltas", content=delta.read_bytes(), headers=admin_headers()
        )
        assert r.status_code == 200, r.text
    served = status(server)
    before = greedy(server)
    assert {x["version"] for x in before} == {str(served["version"])}
    server.stop()
    log = restarted_log(server)
    after = status(server)
    assert (after["version"], after["fingerprint"]) == (served["version"], served["fingerprint"])
    assert after["next_version"] == served["next_version"]  # numbers are never reused
    assert greedy(server) == before
    assert f"restored model version {served['version']}" in log
    assert "loaded by the engine at start, checked here" in log  # --load-format jlserve
    # nothing changed on disk: the base digests come from the state dir's cache
    assert "taken from the digest cache" in log and "hashed base weights" not in log


def test_restart_after_the_base_file_changed_rehashes_it_and_says_why(setup, delta_chain):
    server, _source, _watch = setup
    served = status(server)
    weights = delta_chain.base / "model.safetensors"
    server.stop()
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    log = restarted_log(server)
    assert "hashed base weights model.safetensors (mtime_ns changed" in log
    after = status(server)  # same bytes, so the same model and version
    assert (after["version"], after["fingerprint"]) == (served["version"], served["fingerprint"])
    server.stop()
    log = restarted_log(server)  # the cache was refreshed by that start
    assert "hashed base weights" not in log


def restarted_log(server) -> str:
    """Start `server` again and return what it logged during this start."""
    offset = server.log_path.stat().st_size
    start_all([server])
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


def test_a_dead_engine_fails_health_until_the_server_exits(setup):
    """Last, it ends the server: vLLM's engine core is killed as a crash would. /health
    never answers OK again (503 degraded, naming the dead engine, while the API server
    lives), then vLLM's own shutdown ends the server so a supervisor restarts it."""
    server, _source, _watch = setup
    assert server.proc is not None
    core = next(
        p for p, cmd in server_processes(server).items() if cmd.startswith(b"VLLM::EngineCore")
    )
    os.kill(core, signal.SIGKILL)
    answers: list[tuple[int, str]] = []
    deadline = time.monotonic() + 120
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{server.url}/health", timeout=5)
            answers.append((r.status_code, r.text))
        except httpx.HTTPError:
            answers.append((0, "unreachable"))
        time.sleep(0.1)
    assert server.proc.poll() is not None, "the server kept running without an engine"
    codes = [code for code, _ in answers]
    first_failure = next(i for i, code in enumerate(codes) if code != 200)
    assert 200 not in codes[first_failure:]
    assert any(code == 503 and "the vLLM engine died" in text for code, text in answers)
