"""Faults during a swap: SIGKILL at each step, a failure inside the engine, a full or
read-only state dir. The server must come back on one consistent version (old or new,
never a mix), say which, and keep serving the previous version exactly after a failure.

Faults are armed with `JLSERVE_FAULT_INJECT` (jlserve/faults.py), which fires once per
process. Server startups dominate the cost, so two servers walk through the kill steps
side by side, each restarted on its state dir with the next fault armed:

    server A: before_apply:kill -> mid_apply:kill   -> mid_apply:raise (+ disk full, read-only)
    server B: state_write:kill  -> after_commit:kill -> state_write:enospc

The references are fresh servers: A before its first update (base, version 0) and a server
started on the merged checkpoint of version 1. That reference then takes one update with
`mid_apply:raise,restore_apply:raise` armed: the swap fails and so does restoring the
previous weights, which must leave it degraded (its outcome is recorded, then checked).

A full state dir needs a filesystem small enough to fill: a tmpfs, mounted where the
machine allows (root). A read-only one is a remounted tmpfs there, else a state dir
without write permission (any other user); only root without the right to mount skips it.
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

from jlserve.errors import ServeConfigError
from jlserve.faults import FAULT_ENV, FaultAction, FaultStep, armed_faults
from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    admin_status,
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
class DegradedOutcome:
    """What a swap whose restore failed too left behind (on the version-1 reference)."""

    update: httpx.Response
    health: httpx.Response
    status: dict
    status_before: dict
    refused_update: httpx.Response
    refused_rollback: httpx.Response
    state_before: bytes
    state_after: bytes
    log: str


@dataclass
class Faults:
    references: dict[int, Reference]
    kills: dict[str, KillOutcome]
    degraded: DegradedOutcome
    a: ServerProcess  # mid_apply:raise armed; its state dir is a tmpfs when mounting works
    b: ServerProcess  # state_write:enospc armed; at version 1
    tmpfs: Path | None
    mount_error: str  # why no tmpfs could be mounted ("" when one was)


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


def _try_mount_tmpfs(path: Path) -> str:
    """A small tmpfs, to fill it for real (needs root); "" when mounted, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return ""
    return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]


def _degrade(server: ServerProcess, data: bytes) -> DegradedOutcome:
    """Post `data` (a delta that fits) to a server armed with `mid_apply:raise,
    restore_apply:raise`, and record everything the failure left behind."""
    state_file = server.state_dir / "state.json"
    state_before, status_before = state_file.read_bytes(), admin_status(server)
    update = post_delta(server, data)
    health = httpx.get(f"{server.url}/health", timeout=30)
    after = admin_status(server)
    refused_update = post_delta(server, data, timeout_s=30)
    refused_rollback = httpx.post(
        f"{server.url}/admin/rollback",
        json={"to_version": 0},
        headers=admin_headers(),
        timeout=30,
    )
    return DegradedOutcome(
        update,
        health,
        after,
        status_before,
        refused_update,
        refused_rollback,
        state_before,
        state_file.read_bytes(),
        server.log_path.read_text(errors="replace"),
    )


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
            answer, fired, admin_status(server), greedy(server), server.log_path.read_text()
        )
    return outcomes


@pytest.fixture(scope="module")
def faults(delta_chain, tmp_path_factory) -> Faults:
    root = tmp_path_factory.mktemp("faults")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    flags = ("--admin-token-file", str(token_file))
    tmpfs = root / "state-a"
    mount_error = _try_mount_tmpfs(tmpfs)
    # The jobs' database stays open for writing; off the tmpfs, which the read-only case
    # remounts (a filesystem with a file open for writing cannot be remounted read-only).
    servers = {
        name: ServerProcess(
            delta_chain.base,
            root / f"state-{name}",
            root / f"{name}.log",
            (*flags, "--jobs-dir", str(root / f"jobs-{name}")),
            env={FAULT_ENV: chain[0]},
        )
        for name, chain in CHAINS.items()
    }
    reference = ServerProcess(
        delta_chain.merged[1],
        root / "ref-state",
        root / "ref1.log",
        flags,
        env={FAULT_ENV: "mid_apply:raise,restore_apply:raise"},  # only fire on a swap
    )
    delta = delta_chain.deltas[0].read_bytes()
    try:
        start_all([*servers.values(), reference])
        references = {
            0: Reference(greedy(servers["a"]), admin_status(servers["a"])["fingerprint"]),
            1: Reference(greedy(reference), admin_status(reference)["fingerprint"]),
        }
        degraded = _degrade(reference, delta_chain.deltas[1].read_bytes())
        reference.stop()
        kills: dict[str, KillOutcome] = {}
        for round_ in (0, 1):
            kills |= _kill_round(servers, delta, round_)
        yield Faults(
            references,
            kills,
            degraded,
            servers["a"],
            servers["b"],
            None if mount_error else tmpfs,
            mount_error,
        )
    finally:
        reference.stop()
        for server in servers.values():
            server.kill()
        if not mount_error:
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
    before = admin_status(server)
    assert before["version"] == 0
    r = post_delta(server, delta_chain.deltas[0].read_bytes())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "engine_error"
    assert "injected fault at mid_apply" in r.json()["error"]["message"]
    assert "fault injection: mid_apply:raise" in server.log_tail(400)
    after = admin_status(server)
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
    before = admin_status(server)
    assert before["version"] == 1
    state_file = server.state_dir / "state.json"
    on_disk = state_file.read_bytes()
    r = post_delta(server, delta_chain.deltas[1].read_bytes())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "state_error"
    assert "No space left on device" in r.json()["error"]["message"]
    assert admin_status(server)["version"] == 1
    assert admin_status(server)["fingerprint"] == before["fingerprint"]
    assert state_file.read_bytes() == on_disk
    assert outputs_only(greedy(server)) == outputs_only(faults.references[1].outputs)
    r = post_delta(server, delta_chain.deltas[1].read_bytes())  # the fault fired once
    assert r.status_code == 200, r.text
    rollback(server, 1)
    assert outputs_only(greedy(server)) == outputs_only(faults.references[1].outputs)


def test_a_failed_restore_after_a_failed_swap_degrades_the_server(faults):
    """The swap fails in the engine and loading the previous weights back fails too
    (`restore_apply`): the engine's weights are unknown, so the server says so everywhere
    and refuses every change, and the state dir still records the served version."""
    out = faults.degraded
    assert out.update.status_code == 500, out.update.text
    assert out.update.json()["error"]["type"] == "engine_error"
    assert "injected fault at mid_apply" in out.update.json()["error"]["message"]
    assert "fault injection: mid_apply:raise" in out.log
    assert "fault injection: restore_apply:raise" in out.log
    reason = "an update failed and restoring version 0 failed too: injected fault at restore_apply"
    assert out.status["degraded"] is not None and reason in out.status["degraded"]
    assert out.health.status_code == 503, out.health.text
    assert out.health.json()["error"]["type"] == "degraded"
    assert reason in out.health.json()["error"]["message"]
    for refused in (out.refused_update, out.refused_rollback):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "degraded"
        assert reason in refused.json()["error"]["message"]
    # nothing was recorded: a restart restores the version the state dir holds
    assert (out.status["version"], out.status["fingerprint"], out.status["chain"]) == (
        out.status_before["version"],
        out.status_before["fingerprint"],
        [],
    )
    assert out.state_after == out.state_before
    assert "DEGRADED: " + reason in out.log


@pytest.mark.parametrize(
    "spec",
    ["mid_aply:raise", "mid_apply", "mid_apply:explode", "mid_apply:raise,oops", ":raise"],
)
def test_a_malformed_fault_setting_is_refused(spec):
    """A typo must never silently test nothing; a server with it refuses to start
    (`test_plugin_mode.py`, `malformed-fault-setting`)."""
    with pytest.raises(ServeConfigError, match=f"{FAULT_ENV}: .* is not STEP:ACTION"):
        armed_faults({FAULT_ENV: spec})


def test_a_well_formed_fault_setting_arms_each_step():
    env = {FAULT_ENV: " mid_apply:raise , restore_apply:kill,"}
    assert armed_faults(env) == {
        FaultStep.MID_APPLY: FaultAction.RAISE,
        FaultStep.RESTORE_APPLY: FaultAction.KILL,
    }
    assert armed_faults({}) == {} and armed_faults({FAULT_ENV: " "}) == {}


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
def _read_only_mount(mount_point: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount_point)], check=True)


@contextlib.contextmanager
def _without_write_permission(state_dir: Path):
    """The state dir and its deltas/ read-only by permissions (binds every user but root)."""
    folders = (state_dir, state_dir / "deltas")
    for folder in folders:
        folder.chmod(0o555)
    try:
        yield
    finally:
        for folder in folders:
            folder.chmod(0o755)


def _unwritable(faults: Faults, condition: str):
    """How to make server A's state dir full or read-only here, and the OS error's words;
    skips, naming what is missing, where this machine cannot."""
    if faults.tmpfs is not None:
        if condition == "disk_full":
            return _full(faults.tmpfs), "No space left on device"
        return _read_only_mount(faults.tmpfs), "Read-only file system"
    if condition == "read_only" and os.geteuid() != 0:
        return _without_write_permission(faults.a.state_dir), "Permission denied"
    pytest.skip(
        f"a {condition.replace('_', ' ')} state dir needs a tmpfs (mounting one failed: "
        f"{faults.mount_error})"
        + ("" if condition == "disk_full" else " or a user other than root")
        + "; ENOSPC at the state.json write is tested without it"
    )


@pytest.mark.parametrize("condition", ["disk_full", "read_only"])
def test_full_or_read_only_state_dir_refuses_the_update(faults, delta_chain, condition):
    server = faults.a
    unwritable, message = _unwritable(faults, condition)
    before = admin_status(server)
    deltas_before = sorted(os.listdir(server.state_dir / "deltas"))
    with unwritable:
        r = post_delta(server, delta_chain.deltas[0].read_bytes())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "state_error"
    assert message in r.json()["error"]["message"]
    assert admin_status(server) == before
    assert sorted(os.listdir(server.state_dir / "deltas")) == deltas_before  # no partial file
    assert greedy(server) == faults.references[0].outputs
