"""The CPU image run as a user runs it: docker/compose.yaml under podman-compose, with
its named volumes, admin secret, published port and read-only watched folder.

Run by `make test-container`, which builds the image first (`make image`) and sets
JLSERVE_TEST_CONTAINERS=1; the tests follow each other on one running stack.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from jlserve.local_server import free_port
from tests.helpers.containers import podman, smollm2_deltas
from tests.helpers.jobs import job_in, upload
from tests.helpers.serving import ADMIN_TOKEN, admin_headers
from tests.helpers.taskfiles import chat_sentiment, smallest_job_files

pytestmark = [pytest.mark.container, pytest.mark.slow]
if os.environ.get("JLSERVE_TEST_CONTAINERS") != "1":
    pytest.skip("container tests run by `make test-container`", allow_module_level=True)

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"
SERVICE = "jlserve-cpu"
IMAGE_USER = 10001
# First start: the entrypoint converts SmolLM2 into the empty models volume, then vLLM starts.
STARTUP_TIMEOUT_S = 600.0
JLSERVE_BIN = str(Path(sys.executable).with_name("jlserve"))
VERSION_HEADER = "x-jlserve-model-version"


@dataclass
class Stack:
    """One compose project of the CPU service, on a free loopback port."""

    project: str
    env: dict[str, str]
    url: str
    token_file: Path
    deltas_dir: Path  # mounted read-only at /deltas and watched
    started: float = 0.0  # time.monotonic() of `compose up`
    deltas: list[Path] = field(default_factory=list)  # made on the host's SmolLM2

    def compose(self, *args: str, timeout: float = 300) -> str:
        cmd = ["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    @property
    def container(self) -> str:
        return self.container_of(SERVICE)

    def container_of(self, service: str) -> str:
        names = podman(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip
        assert len(names) == 1, names
        return names[0]

    def logs(self, service: str = SERVICE) -> str:
        return podman("logs", self.container_of(service), check=False)

    def wait_first_answer(self, started: float) -> float:
        """Seconds from `started` to the first chat completion; fails with the logs."""
        deadline = started + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    chat(self)
                    return time.monotonic() - started
            except (httpx.HTTPError, openai.APIError):
                pass
            state = podman(
                "inspect", "--format", "{{.State.Status}} {{.RestartCount}}", self.container
            ).split()  # fmt: skip
            assert state[0] in {"running", "created", "configured"}, self.logs()[-4000:]
            assert state[1] == "0", "the container restarted:\n" + self.logs()[-4000:]
            assert time.monotonic() < deadline, "no answer in time:\n" + self.logs()[-4000:]
            time.sleep(1.0)


def chat(stack: Stack) -> tuple[str, str]:
    """One chat completion with the openai client: (answer, version header)."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=60)
    model = client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    return raw.parse().choices[0].message.content or "", raw.headers[VERSION_HEADER]


def status(stack: Stack) -> dict:
    r = httpx.get(f"{stack.url}/admin/status", headers=admin_headers(), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_version(stack: Stack, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while status(stack)["version"] != version:
        assert time.monotonic() < deadline, (
            f"version {version} not reached:\n{stack.logs()[-3000:]}"
        )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("container")
    token_file = root / "admin_token"
    token_file.write_text(ADMIN_TOKEN)
    deltas_dir = root / "deltas"
    deltas_dir.mkdir()
    # Bind mounts keep host modes: the image's user 10001 must read both.
    token_file.chmod(0o644)
    deltas_dir.chmod(0o755)
    port = free_port()
    env = {
        **os.environ,
        "JLSERVE_HOST_PORT": str(port),
        "JLSERVE_ADMIN_SECRET": str(token_file),
        "JLSERVE_DELTAS_DIR": str(deltas_dir),
    }
    s = Stack(f"jlserve-test-{port}", env, f"http://127.0.0.1:{port}", token_file, deltas_dir)
    s.started = time.monotonic()
    s.compose("up", "-d", "--no-build", SERVICE)
    yield s
    s.compose("down", "-v", "-t", "30")
    # podman-compose 1.0.3 leaves the project's network; each takes one of podman's subnets.
    podman("network", "rm", f"{s.project}_default")


def test_first_start_prepares_the_model_and_answers_chat(stack):
    seconds = stack.wait_first_answer(stack.started)
    answer, version = chat(stack)
    assert answer.strip() and version == "0"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", "jlserve:cpu"))
    print(
        f"\ncontainer: first start (model prepared into the empty volume) to first answer "
        f"{seconds:.1f} s; image {size / 2**30:.2f} GiB; load {os.getloadavg()}"
    )


def test_runs_as_the_image_user_not_root(stack):
    uids = podman("exec", stack.container, "sh", "-c", "grep ^Uid: /proc/1/status").split()
    assert uids[1:] == [str(IMAGE_USER)] * 4, uids
    assert podman("exec", stack.container, "id", "-u").strip() == str(IMAGE_USER)


def test_healthcheck_command_passes(stack):
    test = podman("inspect", "--format", "{{json .Config.Healthcheck.Test}}", stack.container)
    assert "/health" in test
    result = subprocess.run(
        ["podman", "healthcheck", "run", stack.container], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_update_with_the_admin_secret(stack, smollm2_dir, tmp_path_factory):
    stack.deltas = deltas = smollm2_deltas(smollm2_dir, tmp_path_factory.mktemp("smollm2-deltas"))[
        0
    ]
    refused = httpx.get(f"{stack.url}/admin/status", timeout=10)
    assert refused.status_code == 401
    result = subprocess.run(
        [JLSERVE_BIN, "update", "--delta", str(deltas[0]), "--url", stack.url,
         "--admin-token-file", str(stack.token_file)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert status(stack)["version"] == 1
    assert chat(stack)[1] == "1"


def test_delta_dropped_into_the_read_only_watched_folder(stack):
    tmp = stack.deltas_dir / ".task2.safetensors.partial"
    tmp.write_bytes(stack.deltas[1].read_bytes())
    tmp.chmod(0o644)
    os.replace(tmp, stack.deltas_dir / "task2.safetensors")
    wait_for_version(stack, 2)
    assert chat(stack)[1] == "2"
    time.sleep(3)  # a few more scans of the folder
    assert httpx.get(f"{stack.url}/health", timeout=5).status_code == 200
    assert status(stack)["version"] == 2
    assert "Read-only file system" not in stack.logs()


def test_restart_keeps_the_version(stack):
    before = status(stack)
    started = time.monotonic()
    stack.compose("restart", SERVICE)
    seconds = stack.wait_first_answer(started)
    after = status(stack)
    assert (after["version"], after["fingerprint"]) == (before["version"], before["fingerprint"])
    assert chat(stack)[1] == str(before["version"])
    print(f"\ncontainer: restart to first answer {seconds:.1f} s; load {os.getloadavg()}")


def test_a_fine_tuning_job_trained_by_the_compose_worker(stack, cl_data_root, tmp_path):
    """The compose file's `worker` service (profile `worker`, started by name) trains a
    job sent with the openai SDK and the server serves it under the same name. Its run
    starts at the served checkpoint, so the server is first rolled back to version 0's
    weights (docs/jobs.md: when the worker's run and the served model disagree)."""
    base = status(stack)["base"]["fingerprint"]
    result = subprocess.run(
        [JLSERVE_BIN, "rollback", "--to", base, "--url", stack.url,
         "--admin-token-file", str(stack.token_file)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    stack.compose("up", "-d", "--no-build", "worker")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=ADMIN_TOKEN, max_retries=0)
    train, valid = smallest_job_files(chat_sentiment(cl_data_root, tmp_path / "sentiment.jsonl"))
    job = client.fine_tuning.jobs.create(
        model=client.models.list().data[0].id,
        training_file=upload(client, train).id,
        validation_file=upload(client, valid).id,
        suffix="sentiment",
    )
    started = time.monotonic()
    try:
        done = job_in(client, job.id, "succeeded", "failed", timeout=900)
    except AssertionError:
        raise AssertionError("job unfinished:\n" + stack.logs("worker")[-4000:]) from None
    assert done.status == "succeeded", (done.error, stack.logs("worker")[-4000:])
    now = status(stack)
    assert (now["version"], now["fingerprint"]) == (done.version, done.fingerprint)
    assert done.parent_fingerprint == base  # trained on the model served then
    assert chat(stack)[1] == str(done.version)
    print(
        f"\ncontainer: a job through the compose worker, created to succeeded "
        f"{time.monotonic() - started:.1f} s; load {os.getloadavg()}"
    )
