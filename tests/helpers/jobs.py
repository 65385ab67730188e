"""`jlserve worker` processes and the waits the jobs tests share."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import openai

from tests.helpers.serving import ADMIN_TOKEN, ServerProcess, until

_STARTED: list[Worker] = []  # every worker this test process started


class Worker:
    """A `jlserve worker` process on RUN_ROOT/run, configured by RUN_ROOT/cfg.yaml.
    `kill_leftover_workers` (after each jobs test) ends one a failed test left running."""

    def __init__(self, server: ServerProcess, run_root: Path, *extra: str) -> None:
        token = run_root / "admin.token"
        token.write_text(ADMIN_TOKEN)
        self.log = run_root / "worker.log"
        cmd = [sys.executable, "-m", "jlserve", "worker", "--url", server.url]
        cmd += ["--run", str(run_root / "run"), "--config", str(run_root / "cfg.yaml")]
        cmd += ["--admin-token-file", str(token), "--poll", "0.5", "--name", "test", *extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _STARTED.append(self)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"worker still running:\n{self.log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def kill_leftover_workers() -> None:
    """SIGKILL every worker still running (a test that failed before its worker ended
    would leave it polling, for good, a server that is gone)."""
    while _STARTED:
        worker = _STARTED.pop()
        if worker.proc.poll() is None:
            worker.kill()


def job_in(client: openai.OpenAI, job_id: str, *statuses: str, timeout: float = 300):
    return until(
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j,
        timeout,
        f"{job_id} to be {statuses}",
    )


def first_metrics(client: openai.OpenAI, job_id: str) -> object:
    return until(
        lambda: any(
            e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job_id, limit=100)
        ),
        what=f"a metrics event of {job_id}",
    )


def upload(client: openai.OpenAI, path: Path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune")
