"""Faults during a swap: SIGKILL at each step, a failure inside the engine, a full or
read-only state dir. The server must come back on one consistent version (old or new,
never a mix), say which, and keep serving the previous version exactly after a failure.

Faults are armed with `JLSERVE_FAULT_INJECT` (jlserve/faults.py), which fires once per
process. Server startups dominate the cost, so two servers walk through the kill steps
side by side, each restarted on its state dir with the next fault armed:

    server A: before_apply:kill -> mid_apply:kill   -> mid_apply:raise (+ disk full, read-only)
    server B: state_write:kill  -> after_commit:kill -> state_write:enospc

The references are fresh servers: A before its first update (base, version 0) and a server
started on the merged checkpoint of version 1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jlserve.faults import FAULT_ENV
from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    greedy,
    outputs_only,
    start_all,
)

pytestmark = pytest.mark.slow

CHAINS = {
    "a": ("before_apply:kill", "mid_apply:kill", "mid_apply:raise"),
    "b": ("state_write:kill", "after_commit:kill", "state_write:enospc"),
}
# The version a server restarted after a kill at each step must serve.
VERSION_AFTER_KILL = {"before_apply": 0, "mid_apply": 0, "state_write": 0, "after_commit": 1}
TMPFS_BYTES = 4 * 1024 * 1024


@dataclass
class Reference:
    outputs: list[dict]
    fingerprint: str


@dataclass
class KillOutcome:
    """What a kill at one step left behind, seen by the restarted server."""

    answer: str  # what the update request got: an HTTP status or the connection error
    fired: bool  # the server log shows the fault firing at this step
    status: dict
    outputs: list[dict]
    log: str


@dataclass
class Faults:
    references: dict[int, Reference]
    kills: dict[str, KillOutcome]
    a: ServerProcess  # mid_apply:raise armed; its state dir is a tmpfs when mounting works
    b: ServerProcess  # state_write:enospc armed; at version 1
    tmpfs: Path | None


def status(server: ServerProcess) -> dict:
    r = httpx.get(f"{server.url}/admin/status", headers=admin_headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def post_delta(server: ServerProcess, data: bytes, timeout_s: float = 120) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/deltas", content=data, headers=admin_headers(), timeout=timeout_s
    )


def rollback(server: ServerProcess, to_version: int) -> None:
    r = httpx.post(
        f"{server.url}/admin/rollback",
        json={"to_version": to_version},
        headers=admin_headers(),
        timeout=120,
    )
    assert r.status_code == 200, r.text


def _try_mount_tmpfs(path: Path) -> bool:
    """A small tmpfs, to fill it for real; needs root (else those tests skip)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def _update_until_killed(server: ServerProcess, data: bytes, step: str) -> tuple[str, bool]:
    """Post an update the armed fault turns into a crash, then make sure all of it is dead."""
    log_before = len(server.log_path.read_text(errors="replace"))
    try:
        answer = str(post_delta(server, data, timeout_s=30).status_code)
    except httpx.HTTPError as exc:
        answer = type(exc).__name__
    server.kill()
    fired = f"fault injection: {step}:kill" in server.log_path.read_text()[log_before:]
    return answer, fired


def _kill_round(
    servers: dict[str, ServerProcess], delta: bytes, round_: int
) -> dict[str, KillOutcome]:
    """Crash every server at its step of `round_`, restart each with its next fault armed,
    and record what the restarted server serves."""
    steps = {name: CHAINS[name][round_].split(":")[0] for name in servers}
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = {
            name: pool.submit(_update_until_killed, server, delta, steps[name])
            for name, server in servers.items()
        }
        answers = {name: future.result() for name, future in futures.items()}
    for name, server in servers.items():
        server.env = {FAULT_ENV: CHAINS[name][round_ + 1]}
    start_all(list(servers.values()))
    outcomes = {}
    for name, server in servers.items():
        answer, fired = answers[name]
        outcomes[steps[name]] = KillOutcome(
            answer, fired, status(server), greedy(server), server.log_path.read_text()
        )
    return outcomes


@pytest.fixture(scope="module")
def faults(delta_chain, tmp_path_factory) -> Faults:
    root = tmp_path_factory.mktemp("faults")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    flags = ("--admin-token-file", str(token_file))
    tmpfs = root / "state-a"
    mounted = _try_mount_tmpfs(tmpfs)
    servers = {
        name: ServerProcess(
            delta_chain.base,
            root / f"state-{name}",
            root / f"{name}.log",
            flags,
            env={FAULT_ENV: chain[0]},
        )
        for name, chain in CHAINS.items()
    }
    reference = ServerProcess(delta_chain.merged[1], root / "ref-state", root / "ref1.log", flags)
    delta = delta_chain.deltas[0].read_bytes()
    try:
        start_all([*servers.values(), reference])
        references = {
            0: Reference(greedy(servers["a"]), status(servers["a"])["fingerprint"]),
            1: Reference(greedy(reference), status(reference)["fingerprint"]),
        }
        reference.stop()
        kills: dict[str, KillOutcome] = {}
        for round_ in (0, 1):
            kills |= _kill_round(servers, delta, round_)
        yield Faults(references, kills, servers["a"], servers["b"], tmpfs if mounted else None)
    finally:
        reference.stop()
        for server in servers.values():
            server.kill()
        if mounted:
            subprocess.run(["umount", str(tmpfs)], check=False)


@pytest.mark.parametrize("step", list(VERSION_AFTER_KILL))
def test_sigkill_during_a_swap_restarts_on_one_consistent_version(faults, step):
    outcome = faults.kills[step]
    expected = VERSION_AFTER_KILL[step]
    reference = faults.references[expected]
    assert outcome.fired, f"the fault at {step} never fired"
    assert outcome.answer != "200", "a killed update must not be acknowledged"
    assert outcome.status["version"] == expected
    assert outcome.status["fingerprint"] == reference.fingerprint
    assert [e["version"] for e in outcome.status["chain"]] == list(range(1, expected + 1))
    assert outcome.status["degraded"] is None
    assert {r["version"] for r in outcome.outputs} == {str(expected)}
    # token ids, logprobs and top-5 logprobs equal a fresh server on that version
    assert outputs_only(outcome.outputs) == outputs_only(reference.outputs)
    if expected:
        assert f"restored model version {expected}" in outcome.log


def test_update_failing_inside_the_engine_is_rolled_back_exactly(faults, delta_chain):
    server = faults.a
    before = status(server)
    assert before["version"] == 0
    r = post_delta(server, delta_chain.deltas[0].read_bytes())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "engine_error"
    assert "injected fault at mid_apply" in r.json()["error"]["message"]
    assert "fault injection: mid_apply:raise" in server.log_tail(400)
    after = status(server)
    assert (after["version"], after["fingerprint"], after["chain"], after["degraded"]) == (
        0,
        before["fingerprint"],
        [],
        None,
    )
    assert greedy(server) == faults.references[0].outputs  # the previous weights, exactly
    # still serving and still updatable: the same delta now applies and is exact
    r = post_delta(server, delta_chain.deltas[0].read_bytes())
    assert r.status_code == 200, r.text
    assert outputs_only(greedy(server)) == outputs_only(faults.references[1].outputs)
    rollback(server, 0)
    assert greedy(server) == faults.references[0].outputs


def test_state_write_failure_restores_the_previous_weights(faults, delta_chain):
    server = faults.b
    before = status(server)
    assert before["version"] == 1
    state_file = server.state_dir / "state.json"
    on_disk = state_file.read_bytes()
    r = post_delta(server, delta_chain.deltas[1].read_bytes())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "state_error"
    assert "No space left on device" in r.json()["error"]["message"]
    assert status(server)["version"] == 1
    assert status(server)["fingerprint"] == before["fingerprint"]
    assert state_file.read_bytes() == on_disk
    assert outputs_only(greedy(server)) == outputs_only(faults.references[1].outputs)
    r = post_delta(server, delta_chain.deltas[1].read_bytes())  # the fault fired once
    assert r.status_code == 200, r.text
    rollback(server, 1)
    assert outputs_only(greedy(server)) == outputs_only(faults.references[1].outputs)


@contextlib.contextmanager
def _full(directory: Path):
    """Fill the filesystem holding `directory` until the kernel says ENOSPC."""
    filler = directory / "filler.bin"
    try:
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        yield
    finally:
        filler.unlink(missing_ok=True)


@contextlib.contextmanager
def _read_only(mount_point: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount_point)], check=True)


@pytest.mark.parametrize(
    ("condition", "message"),
    [("disk_full", "No space left on device"), ("read_only", "Read-only file system")],
)
def test_full_or_read_only_state_dir_refuses_the_update(faults, delta_chain, condition, message):
    if faults.tmpfs is None:
        pytest.skip("needs root to mount a tmpfs state dir")
    server = faults.a
    before = status(server)
    deltas_before = sorted(os.listdir(faults.tmpfs / "deltas"))
    make = _full if condition == "disk_full" else _read_only
    with make(faults.tmpfs):
        r = post_delta(server, delta_chain.deltas[0].read_bytes())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "state_error"
    assert message in r.json()["error"]["message"]
    assert status(server) == before
    assert sorted(os.listdir(faults.tmpfs / "deltas")) == deltas_before  # no partial file
    assert greedy(server) == faults.references[0].outputs
