"""`--watch DIR` on a read-only folder, the preempt policy, restart from the state dir
(under other swap settings: drain, preempting past a short drain timeout), a dead engine,
and (last) a corrupt state dir, which must stop the server from starting.

The watched folder is read-only to the server as compose mounts it (a read-only bind
mount) where the machine allows mounting, else by permissions (a user other than root);
only where neither works (root without the right to mount) does it stay writable, and the
one test that needs it read-only says so as a skip. Every other test runs everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jlserve.delta import read_delta
from jlserve.vocab import DEFAULT_MAX_FILE_BYTES
from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    admin_status,
    greedy,
    metric_samples,
    open_stalled_stream,
    read_stream_to_end,
    refused_start,
    server_processes,
    start_all,
    until,
    watch_outcome,
)
from tests.jlserve.server.test_serving import (
    Streamed,
    _reference_texts,
    _streams_during_updates,
)

pytestmark = pytest.mark.slow

# After the first restart the server drains, and preempts what still runs after this long.
# Short, so a quiet machine cannot finish every 200-token stream inside it (at 0.5 s one
# CI run drained all nine swaps in time and never preempted).
DRAIN_TIMEOUT_S = 0.1
DRAIN_THEN_PREEMPT = (
    "--swap-policy", "drain", "--drain-timeout", str(DRAIN_TIMEOUT_S),
    "--drain-timeout-action", "preempt",
)  # fmt: skip
HUGE_BYTES = 1 << 40  # a sparse 1 TiB file: no machine here could read it into memory


@dataclass
class WatchFolder:
    """The folder the server watches (`view`) and where the test writes (`source`)."""

    source: Path
    view: Path
    read_only: str | None  # how the server is kept from writing to `view`; None: it is not
    why_writable: str = ""

    @contextlib.contextmanager
    def writable(self) -> Iterator[Path]:
        """`source`, writable for the duration (only the permissions fallback needs it)."""
        by_permissions = self.source == self.view and self.read_only is not None
        if by_permissions:
            self.source.chmod(0o755)
        try:
            yield self.source
        finally:
            if by_permissions:
                self.source.chmod(0o555)


def _first_line(done: subprocess.CompletedProcess) -> str:
    return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]


def _watch_folder(root: Path) -> WatchFolder:
    """A read-only bind mount of a writable folder, as compose mounts the watched folder
    (needs the right to mount); else the folder itself without write permission, which
    binds every user but root; else a writable folder (and the reason)."""
    source, view = root / "incoming-src", root / "incoming"
    source.mkdir()
    view.mkdir()
    bound = subprocess.run(
        ["mount", "--bind", str(source), str(view)], capture_output=True, text=True, check=False
    )
    if bound.returncode == 0:
        ro = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(view)],
            capture_output=True,
            text=True,
            check=False,
        )
        if ro.returncode == 0:
            return WatchFolder(source, view, "a read-only bind mount")
        subprocess.run(["umount", str(view)], check=False, capture_output=True)
        failed = f"`mount -o remount,ro,bind` failed: {_first_line(ro)}"
    else:
        failed = f"`mount --bind` failed: {_first_line(bound)}"
    view.rmdir()
    if os.geteuid() != 0:
        source.chmod(0o555)
        return WatchFolder(source, source, f"no write permission ({failed})")
    why = f"{failed}, and permissions do not bind root"
    return WatchFolder(source, source, None, why)


@pytest.fixture(scope="module")
def setup(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    folder = _watch_folder(root)
    flags = (
        "--admin-token-file", str(token_file), "--watch", str(folder.view),
        "--swap-policy", "preempt",
    )  # fmt: skip
    server = ServerProcess(delta_chain.base, root / "state", root / "server.log", flags)
    try:
        start_all([server])
        yield server, folder
    finally:
        server.stop()
        if folder.view != folder.source:
            subprocess.run(["umount", str(folder.view)], check=False, capture_output=True)
        folder.source.chmod(0o755)


@pytest.fixture(scope="module")
def references(setup, delta_chain) -> dict[str, dict[str, str]]:
    """What each model of the chain answers alone to the stream prompts (200 tokens):
    fingerprint -> prompt -> text. Leaves the server at the last delta's model."""
    server, _folder = setup
    post = {"to_version": 0}
    assert httpx.post(
        f"{server.url}/admin/rollback", json=post, headers=admin_headers(), timeout=120
    ).is_success
    expected = {admin_status(server)["fingerprint"]: asyncio.run(_reference_texts(server))}
    for delta in delta_chain.deltas:
        r = httpx.post(
            f"{server.url}/admin/deltas",
            content=delta.read_bytes(),
            headers=admin_headers(),
            timeout=120,
        )
        assert r.status_code == 200, r.text
        expected[admin_status(server)["fingerprint"]] = asyncio.run(_reference_texts(server))
    return expected


def drop(folder: WatchFolder, name: str, data: bytes | int) -> None:
    """Write-then-rename, as the watch directory requires (into the writable source);
    an int makes a sparse file of that size."""
    with folder.writable() as source:
        tmp = source / f".{name}.partial"
        if isinstance(data, int):
            with open(tmp, "wb") as f:
                f.truncate(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, source / name)


def child(path: Path) -> str:
    return read_delta(path).metadata.child_fingerprint


def test_watch_folder_applies_by_lineage_and_skips_bad_and_stale_files(setup, delta_chain):
    server, folder = setup
    deltas = [d.read_bytes() for d in delta_chain.deltas]
    drop(folder, "b-task2.safetensors", deltas[1])
    drop(folder, "broken.safetensors", b"not a safetensors file at all")
    drop(folder, "f-huge.safetensors", HUGE_BYTES)  # refused by its size, never read
    with folder.writable() as source:
        (source / "e-link.safetensors").symlink_to(delta_chain.deltas[0])
    time.sleep(2.5)  # task2 waits for its parent
    assert admin_status(server)["version"] == 0
    drop(folder, "c-task1.safetensors", deltas[0])
    until(lambda: admin_status(server)["fingerprint"] == child(delta_chain.deltas[1]), 60)
    # a stale file (its parent is long gone) waits and blocks nothing
    drop(folder, "a-stale.safetensors", deltas[0])
    drop(folder, "d-task3.safetensors", deltas[2])
    until(lambda: admin_status(server)["fingerprint"] == child(delta_chain.deltas[2]), 60)
    assert [e["task"] for e in admin_status(server)["chain"]] == ["task1", "task2", "task3"]
    until(lambda: watch_outcome(admin_status(server), "d-task3.safetensors") == "applied", 60)

    # nothing in the watched folder was moved or written; the bookkeeping is in the state dir
    assert sorted(p.name for p in folder.view.iterdir()) == [
        "a-stale.safetensors",
        "b-task2.safetensors",
        "broken.safetensors",
        "c-task1.safetensors",
        "d-task3.safetensors",
        "e-link.safetensors",
        "f-huge.safetensors",
    ]
    ledger = json.loads((server.state_dir / "watch.json").read_text())["files"]
    outcomes = {name: record["outcome"] for name, record in ledger.items()}
    assert outcomes == {
        "b-task2.safetensors": "applied",
        "broken.safetensors": "rejected",
        "c-task1.safetensors": "applied",
        "d-task3.safetensors": "applied",
        "e-link.safetensors": "rejected",
        "f-huge.safetensors": "rejected",
    }
    assert "broken.safetensors" in ledger["broken.safetensors"]["message"]
    assert "symlink" in ledger["e-link.safetensors"]["message"]
    # the size check's own words: the reader's limit ("file is N bytes, ...") never ran,
    # and reading 1 TiB would have failed with MemoryError, leaving no record at all
    assert ledger["f-huge.safetensors"]["message"] == (
        f"{HUGE_BYTES} bytes, over the limit of {DEFAULT_MAX_FILE_BYTES}"
    )
    assert ledger["f-huge.safetensors"]["size"] == HUGE_BYTES
    assert httpx.get(f"{server.url}/health").status_code == 200
    with folder.writable() as source:  # leave nothing that could fit a later model
        for name in os.listdir(source):
            (source / name).unlink()


def test_the_watched_folder_was_read_only_to_the_server(setup):
    """The files above were applied from a folder the server cannot write to (the server
    runs as this user, so this process's view is the server's)."""
    server, folder = setup
    if folder.read_only is None:
        pytest.skip(f"the watched folder cannot be made read-only here: {folder.why_writable}")
    with pytest.raises(OSError):
        (folder.view / "probe").write_text("x")
    ledger = json.loads((server.state_dir / "watch.json").read_text())["files"]
    assert [r["outcome"] for r in ledger.values()].count("applied") == 3


CROSSING_ROUNDS = 10
# vLLM counts each running request a swap preempts (and its own, under KV-cache pressure,
# which the tests' short streams never reach); a waiting request is frozen uncounted
PREEMPTIONS = "vllm:num_preemptions_total"


@dataclass(frozen=True)
class Crossing:
    """One round of streams during the chain's updates, as `_crossing_streams` saw it."""

    crossed: list[Streamed]  # not the text of the model they were admitted under
    preempted: int  # preemptions: running requests frozen, recomputed on the new weights
    log: str  # what the server logged during the round
    rounds: int  # rounds run to get it


def _preemptions(server: ServerProcess) -> float:
    return sum(sample.value for sample in metric_samples(server, PREEMPTIONS))


def _crossing_streams(server, delta_chain, references, logged: str = "") -> Crossing:
    """Run streams (test_serving's `_streams_during_updates`) while the chain is swapped
    in (from version 0), round after round, until vLLM preempted requests at a swap (its
    preemption counter rose), a response crossed a swap and, with `logged`, the server
    logged that text; at most CROSSING_ROUNDS rounds. A round can show nothing either
    way: on a loaded machine the engine can finish every stream before an update reaches
    it (the client and the API server lag; the tiny model decodes 200 tokens in a third
    of a second), and a request preempted near its end can resume to the same text.
    Returns a Crossing: that round's responses that are not the text of the model they
    were admitted under (they ran across a swap: frozen, then resumed on the new
    weights), its preemptions, its log and the rounds run."""
    rounds = 0
    while rounds < CROSSING_ROUNDS:
        rounds += 1
        offset = server.log_path.stat().st_size
        r = httpx.post(
            f"{server.url}/admin/rollback",
            json={"to_version": 0},
            headers=admin_headers(),
            timeout=120,
        )
        assert r.status_code == 200, r.text
        before = _preemptions(server)
        results = asyncio.run(_streams_during_updates(server, delta_chain.deltas))
        assert all(r.status == 200 for r in results)  # no request dropped or failed
        assert all(len(r.text) > 0 for r in results)
        assert admin_status(server)["fingerprint"] == child(delta_chain.deltas[2])
        crossed = [r for r in results if r.text != references[r.fingerprint][r.prompt]]
        preempted = int(_preemptions(server) - before)
        log = server.log_path.read_bytes()[offset:].decode(errors="replace")
        if preempted and crossed and logged in log:
            break
    return Crossing(crossed, preempted, log, rounds)


def test_preempt_policy_serves_every_stream_and_overlaps_versions(setup, delta_chain, references):
    # What each model answers alone: a response that ran across a swap (frozen, then
    # resumed on the new weights) matches neither; under drain every response matches the
    # model it was admitted under (test_serving's drain test).
    server, _folder = setup
    assert admin_status(server)["swap_policy"] == "preempt"
    seen = _crossing_streams(server, delta_chain, references)
    assert seen.preempted, f"no swap met a running request in {seen.rounds} rounds"
    assert seen.crossed, f"{seen.preempted} preemption(s), yet no response crossed a swap"


def test_restart_after_two_updates_serves_the_same_model(setup, delta_chain):
    server, _folder = setup
    r = httpx.post(
        f"{server.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers(), timeout=120
    )
    assert r.status_code == 200, r.text
    for delta in delta_chain.deltas[:2]:
        r = httpx.post(
            f"{server.url}/admin/deltas",
            content=delta.read_bytes(),
            headers=admin_headers(),
            timeout=120,
        )
        assert r.status_code == 200, r.text
    served = admin_status(server)
    before = greedy(server)
    assert {x["version"] for x in before} == {str(served["version"])}
    server.stop()
    # the swap settings are the command line's; the state dir only holds the model
    server.flags = (*server.flags, *DRAIN_THEN_PREEMPT)  # the last --swap-policy wins
    log = restarted_log(server)
    after = admin_status(server)
    assert (after["version"], after["fingerprint"]) == (served["version"], served["fingerprint"])
    assert (after["swap_policy"], after["drain_timeout_s"], after["drain_timeout_action"]) == (
        "drain",
        DRAIN_TIMEOUT_S,
        "preempt",
    )
    assert after["next_version"] == served["next_version"]  # numbers are never reused
    assert greedy(server) == before
    assert f"restored model version {served['version']}" in log
    assert "loaded by the engine at start, checked here" in log  # --load-format jlserve
    # nothing changed on disk: the base digests come from the state dir's cache
    assert "taken from the digest cache" in log and "hashed base weights" not in log


def test_restart_after_the_base_file_changed_rehashes_it_and_says_why(setup, delta_chain):
    server, _folder = setup
    served = admin_status(server)
    weights = delta_chain.base / "model.safetensors"
    server.stop()
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    log = restarted_log(server)
    assert "hashed base weights model.safetensors (mtime_ns changed" in log
    after = admin_status(server)  # same bytes, so the same model and version
    assert (after["version"], after["fingerprint"]) == (served["version"], served["fingerprint"])
    server.stop()
    log = restarted_log(server)  # the cache was refreshed by that start
    assert "hashed base weights" not in log


def test_past_the_drain_timeout_preempt_swaps_with_a_stalled_reader_open(setup, delta_chain):
    """A client that stops reading keeps its request admitted, so the drain cannot end;
    with `--drain-timeout-action preempt` the update goes on after the drain timeout
    (not refused, not waiting for the reader), and the stalled request is not dropped:
    read later, it completes, labelled with the version it was admitted under."""
    server, _folder = setup
    r = httpx.post(
        f"{server.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers(), timeout=120
    )
    assert r.status_code == 200, r.text
    before = admin_status(server)
    assert (before["swap_policy"], before["drain_timeout_action"]) == ("drain", "preempt")
    offset = server.log_path.stat().st_size
    sock, first = open_stalled_stream(server)
    try:
        time.sleep(1.0)  # let the server fill the socket buffers and block
        started = time.monotonic()
        r = httpx.post(
            f"{server.url}/admin/deltas",
            content=delta_chain.deltas[0].read_bytes(),
            headers=admin_headers(),
            timeout=60,
        )
        waited = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json()["applied"] is True and r.json()["previous_version"] == 0
        assert DRAIN_TIMEOUT_S <= waited < 30  # it waited for the drain, then went on
        new = r.json()["version"]
        assert {x["version"] for x in greedy(server)} == {str(new)}  # new requests: new model
        stream = read_stream_to_end(sock, first)
    finally:
        sock.close()
    log = server.log_path.read_bytes()[offset:].decode(errors="replace")
    assert f"drain timeout ({DRAIN_TIMEOUT_S:.1f} s): preempting 1 running request(s)" in log
    assert stream.done, "the stalled request did not complete"
    assert stream.headers["x-jlserve-model-version"] == "0"  # the admission version
    assert stream.headers["x-jlserve-model-fingerprint"] == before["fingerprint"]
    finished = [c for e in stream.events for c in e["choices"] if c.get("finish_reason")]
    assert sorted(c["index"] for c in finished) == list(range(32))  # every choice ended
    assert {c["finish_reason"] for c in finished} == {"length"}  # at max_tokens, not cut
    assert admin_status(server)["version"] == new


def test_past_the_drain_timeout_preempt_recomputes_running_requests_on_the_new_model(
    setup, delta_chain, references
):
    """Streams still running after the drain timeout are preempted: frozen and recomputed
    on the new weights after the swap, so a response may mix versions, and none fails."""
    server, _folder = setup
    assert admin_status(server)["drain_timeout_action"] == "preempt"
    preempting = f"drain timeout ({DRAIN_TIMEOUT_S:.1f} s): preempting"
    # only a text that is not its admission model's counts: a drain that waited for the
    # engine would leave every response whole on the model it was admitted under
    seen = _crossing_streams(server, delta_chain, references, logged=preempting)
    assert preempting in seen.log and seen.preempted, (
        f"no update preempted a running request past the drain timeout in {seen.rounds} rounds"
    )
    assert seen.crossed, f"{seen.preempted} preemption(s), yet no response was recomputed"


def restarted_log(server) -> str:
    """Start `server` again and return what it logged during this start."""
    offset = server.log_path.stat().st_size
    start_all([server])
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


def test_a_dead_engine_fails_health_until_the_server_exits(setup):
    """Last, it ends the server: vLLM's engine core is killed as a crash would. /health
    never answers OK again (503 degraded, naming the dead engine, while the API server
    lives), then vLLM's own shutdown ends the server so a supervisor restarts it."""
    server, _folder = setup
    assert server.proc is not None
    core = next(
        p for p, cmd in server_processes(server).items() if cmd.startswith(b"VLLM::EngineCore")
    )
    os.kill(core, signal.SIGKILL)
    answers: list[tuple[int, str]] = []
    deadline = time.monotonic() + 120
    # polled every 10 ms: the 503 lasts from the engine's death to vLLM's next watchdog
    # tick (every 5 s), which can come within a fraction of a second
    with httpx.Client(timeout=5) as client:
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                r = client.get(f"{server.url}/health")
                answers.append((r.status_code, r.text))
            except httpx.HTTPError:
                answers.append((0, "unreachable"))
            time.sleep(0.01)
    assert server.proc.poll() is not None, "the server kept running without an engine"
    codes = [code for code, _ in answers]
    first_failure = next(i for i, code in enumerate(codes) if code != 200)
    assert 200 not in codes[first_failure:]
    assert any(code == 503 and "the vLLM engine died" in text for code, text in answers)


def _corrupted(path: Path) -> bytes:
    """`path` (a delta file) with one bit of one changed value flipped: still a well-formed
    delta of the same lineage, as bit rot would leave it, but it no longer makes the
    model it declares. vLLM's loader applies it without complaint; only the check of
    the recorded fingerprint can tell."""
    delta = read_delta(path)
    name = sorted(delta.changes)[0]
    change = delta.changes[name]
    xor = change.xor.clone()
    xor[0] ^= 2 if int(xor[0]) != 2 else 1  # a low mantissa bit; an XOR is never 0
    changes = {**delta.changes, name: dataclasses.replace(change, xor=xor)}
    return dataclasses.replace(delta, changes=changes).to_bytes(delta.metadata.format_version)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("damage", ["flipped bit", "truncated"])
def test_a_corrupt_delta_in_the_state_dir_refuses_start_and_changes_nothing(setup, damage):
    """Last (the engine died above): restarting on a state dir whose recorded delta was
    altered must not serve anything, must say why in one message, and must leave the
    state dir as it was, so the recorded model is still the one a repaired dir restores.
    A flipped bit still parses (vLLM's loader applies it; the coordinator's check catches
    it); a truncated file does not parse (the loader loads the base, the coordinator
    refuses)."""
    server, _folder = setup
    server.stop()
    state = json.loads((server.state_dir / "state.json").read_text())
    assert state["chain"], "the tests above leave applied deltas"
    last = state["chain"][-1]
    target = server.state_dir / last["file"]
    good = target.read_bytes()
    target.write_bytes(_corrupted(target) if damage == "flipped bit" else good[: len(good) // 2])
    before = _files(server.state_dir)
    try:
        code, log = refused_start(server)
        after = _files(server.state_dir)
    finally:
        target.write_bytes(good)
    assert code != 0
    # one message naming the state dir, the version it cannot restore, the file and why
    why = "result sha256:" if damage == "flipped bit" else ""
    message = (
        f"cannot restore the recorded model version {last['version']} "
        f"({last['fingerprint']}): {last['file']}: {why}"
    )
    errors = [line for line in log.splitlines() if message in line]
    assert len(errors) == 1, log[-4000:]
    assert errors[0].startswith(f"jlserve.errors.StateError: {server.state_dir.resolve()}: ")
    assert "refusing to start rather than serve another version" in errors[0]
    assert after == before  # nothing in the state dir was rewritten, moved or added
