"""Real `jlserve serve` processes for the serving tests, and the requests they compare.

Each server is a child process group on 127.0.0.1 and a free port, with a small CPU KV
cache; `stop()` ends the whole group (vLLM's engine core and workers included), `kill()`
SIGKILLs it as a crash would.
Starting several at once overlaps their startup, which is mostly single-threaded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
STARTUP_TIMEOUT_S = 240.0
ENGINE_ARGS = ("--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "32")
PROMPTS = ("the world of music", "Task Instruction: Options: Text:", "paris france capital city")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    model: Path
    state_dir: Path
    log_path: Path
    flags: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment (faults)
    api_key: str | None = None  # vLLM's inference key (`--api-key`)
    engine_args: Sequence[str] = ()  # vLLM engine args after the defaults (ENGINE_ARGS)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        return str(self.model.resolve())

    @property
    def inference_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> ServerProcess:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1") | dict(self.env)
        cmd = [sys.executable, "-m", "jlserve", "serve", "--model", str(self.model)]
        cmd += ["--state-dir", str(self.state_dir), "--port", str(self.port), *self.flags]
        cmd += ["--api-key", self.api_key] if self.api_key else []
        cmd += ["--", *ENGINE_ARGS, *self.engine_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"server exited during startup:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self, timeout_s: float = 30.0) -> None:
        """SIGKILL the whole group (API server, engine core, workers), as a crash of the
        machine would, and wait until none of it is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self.proc = None

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_all(servers: Sequence[ServerProcess]) -> list[ServerProcess]:
    """Start servers together and wait for all; stop every one if any fails."""
    try:
        for s in servers:
            s.start()
        return [s.wait_ready() for s in servers]
    except BaseException:
        for s in servers:
            s.stop()
        raise


def admin_headers(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def greedy(
    server: ServerProcess, prompts: Sequence[str] = PROMPTS, max_tokens: int = 12
) -> list[dict]:
    """Greedy completions with top-5 logprobs: token ids, texts, logprobs, version."""
    results = []
    with httpx.Client(base_url=server.url, headers=server.inference_headers, timeout=60) as http:
        for prompt in prompts:
            r = http.post(
                "/v1/completions",
                json={
                    "model": server.model_name,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "logprobs": 5,
                    "return_tokens_as_token_ids": True,
                    "ignore_eos": True,
                },
            )
            r.raise_for_status()
            choice = r.json()["choices"][0]
            results.append(
                {
                    "tokens": choice["logprobs"]["tokens"],
                    "logprobs": choice["logprobs"]["token_logprobs"],
                    "top": choice["logprobs"]["top_logprobs"],
                    "version": r.headers["x-jlserve-model-version"],
                }
            )
    return results


def outputs_only(results: list[dict]) -> list[dict]:
    """Results without the version label, for comparing servers at different versions."""
    return [{k: v for k, v in r.items() if k != "version"} for r in results]
