"""LocalServer: a SIGTERM to the process that started a server stops the server too.

The server runs in its own process group, which a SIGTERM to its owner's group does not
reach (`kill -- -PGID`, `timeout`); without the owner's `finally: server.stop()` it would
be left running, orphaned, holding its port, memory and cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jlserve.local_server import _live_members, _wait_group_gone

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The owner, as the demo and the benchmarks hold a server: start, use, stop in `finally`.
OWNER = """
import sys, time
from pathlib import Path
from tests.helpers.serving import ServerProcess
root = Path(sys.argv[2])
server = ServerProcess(Path(sys.argv[1]), root / "state", root / "server.log", ("--insecure-admin",))
try:
    server.start().wait_ready()
    print(server.proc.pid, flush=True)
    time.sleep(600)
finally:
    server.stop()
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_owner_stops_its_server(tiny_model_dir, tmp_path):
    command = [sys.executable, "-c", OWNER, str(tiny_model_dir), str(tmp_path)]
    server_pid = None
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as owner:
        try:
            line = owner.stdout.readline()  # the server's pid, once it answers /health
            assert line.strip().isdigit(), f"the server did not start: {line!r}"
            server_pid = int(line)
            assert _group_alive(server_pid)
            owner.send_signal(signal.SIGTERM)
            assert owner.wait(timeout=90) == 128 + signal.SIGTERM  # exited through `finally`
            # stop() returns once no process of the group is left running (the engine
            # processes end after the API server; their zombies wait for PID 1)
            assert not _live_members(server_pid), "the server outlived its owner"
        finally:
            owner.kill()
            if server_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server_pid, signal.SIGKILL)


def test_stop_takes_a_group_of_zombies_as_gone():
    """A process that exited but was not reaped (a zombie: in a container without an init
    process, an engine process orphaned by the API server stays one) still answers
    killpg(pgid, 0); waiting for it to go would take the whole timeout."""
    child = subprocess.Popen(["sleep", "0.1"], start_new_session=True)
    try:
        assert _live_members(child.pid)
        deadline = time.monotonic() + 30
        while _state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(child.pid) == "Z" and _group_alive(child.pid)  # exited, not reaped
        assert _wait_group_gone(child.pid, time.monotonic() + 30)
        assert not _live_members(child.pid)
    finally:
        child.wait()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
