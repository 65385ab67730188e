"""`jlserve serve` as a child process on loopback: for the demo, benchmarks and tests.

The server runs in its own process group, so `stop()` (SIGTERM) and `kill()` (SIGKILL,
as a crash would) reach vLLM's engine core and workers too. Output goes to a log file;
`log_tail()` shows its end when startup fails.

Its own group is also out of reach of a SIGTERM sent to ours (`kill -- -PGID`, `timeout`),
which would end this process without running its `finally` blocks and leave the server
running, orphaned. So `start()` turns SIGTERM into `SystemExit` (only when it runs in the
main thread and SIGTERM still has its default action): the callers' `finally:
server.stop()` then runs. A program with its own SIGTERM handler (the test suite's
raises KeyboardInterrupt, which ends a pytest session) keeps it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from jlserve.errors import JlserveError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(143) here, unless another handler was set (or we are not
    the main thread, where Python allows none)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise SystemExit(128 + signum)


class ServerStartError(JlserveError):
    """The server exited or did not answer /health in time (the message holds its log)."""


@dataclass
class LocalServer:
    model: Path
    state_dir: Path
    log_path: Path
    flags: Sequence[str] = ()  # jlserve serve flags, e.g. ("--insecure-admin",)
    engine_args: Sequence[str] = ()  # after `--`: vLLM engine args
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment
    api_key: str | None = None  # the inference key (written to a 0600 file next to the log)
    port: int = field(default_factory=free_port)
    startup_timeout_s: float = 300.0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "jlserve", "serve", "--model", str(self.model)]
        cmd += ["--state-dir", str(self.state_dir), "--port", str(self.port), *self.flags]
        cmd += ["--api-key-file", str(self.api_key_file)] if self.api_key else []
        return [*cmd, "--", *self.engine_args]

    @property
    def api_key_file(self) -> Path:
        return self.log_path.with_name(self.log_path.stem + ".api-key")

    def start(self) -> LocalServer:
        _exit_on_sigterm()
        env = dict(os.environ, PYTHONUNBUFFERED="1") | dict(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.api_key:  # a secret travels in a file, never on a command line
            fd = os.open(self.api_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.api_key)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        return self

    def wait_ready(self) -> LocalServer:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerStartError(f"server exited during startup:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerStartError(
            f"server not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the group and wait until no process of it runs (vLLM ends its engine
        processes before the API server exits; the wait guards the case where one does
        not); SIGKILL what is left once `timeout_s` passed."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
            if _wait_group_gone(self.proc.pid, deadline):
                self.proc = None
                return
        self.kill(timeout_s)

    def kill(self, timeout_s: float = 30.0) -> None:
        """SIGKILL the whole group (API server, engine core, workers), as a crash of the
        machine would, and wait until none of it is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=timeout_s)
        _wait_group_gone(self.proc.pid, time.monotonic() + timeout_s, signal.SIGKILL)
        self.proc = None

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _wait_group_gone(pgid: int, deadline: float, resend: int | None = None) -> bool:
    """Wait until no live process of group `pgid` is left (True) or `deadline` (monotonic
    clock) passed (False), sending `resend` to the group on each look. A zombie counts as
    gone: once the API server exited, its children's zombies wait for PID 1 to reap them,
    which a container without an init process never does."""
    while True:
        if resend is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, resend)
        if not _live_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _live_members(pgid: int) -> bool:
    """Whether group `pgid` has a process that is not a zombie (Linux /proc; elsewhere,
    any process)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False
