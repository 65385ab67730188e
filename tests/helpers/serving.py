"""Real `jlserve serve` processes for the serving tests, and the requests they compare.

Each server is a child process group on 127.0.0.1 and a free port, with a small CPU KV
cache; `stop()` ends the whole group (vLLM's engine core and workers included), `kill()`
SIGKILLs it as a crash would.
Starting several at once overlaps their startup, which is mostly single-threaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from jlserve.local_server import LocalServer

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
STARTUP_TIMEOUT_S = 240.0
ENGINE_ARGS = ("--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "32")
# vLLM's CPU backend repacks linear weights for oneDNN (-> the reload path) only where
# oneDNN has a kernel for the dtype: bf16 needs AVX-512 BF16/AMX, float32 runs on any x86.
# Tests of the reload path serve in float32 (main and reference alike) so they take that
# path on every CPU; elsewhere a bf16 model on an AVX2-only CPU keeps dense weights.
REPACKED_ARGS = ("--dtype", "float32")
PROMPTS = ("the world of music", "Task Instruction: Options: Text:", "paris france capital city")


@dataclass
class ServerProcess(LocalServer):
    """A LocalServer with the test defaults: small context and KV cache, eager, and the
    shared startup timeout; `engine_args` given by a test come after ENGINE_ARGS."""

    startup_timeout_s: float = STARTUP_TIMEOUT_S

    def __post_init__(self) -> None:
        self.engine_args = (*ENGINE_ARGS, *self.engine_args)
        self.env = {"VLLM_CPU_KVCACHE_SPACE": "1", **self.env}

    @property
    def model_name(self) -> str:
        """What `/v1/models` lists: the checkpoint folder's name (`--served-model-name`)."""
        return self.model.resolve().name

    @property
    def inference_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


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


def metric_samples(server: LocalServer, name: str) -> list[Sample]:
    """The samples called `name` (e.g. `vllm:num_preemptions_total`) on `/metrics`."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    families = text_string_to_metric_families(text)
    return [sample for family in families for sample in family.samples if sample.name == name]


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


def stalled_stream(server: ServerProcess) -> socket.socket:
    """A streaming completion whose client reads the response head and then nothing:
    with a tiny receive window, the server's send blocks and the request stays open."""
    return open_stalled_stream(server)[0]


def open_stalled_stream(server: ServerProcess) -> tuple[socket.socket, bytes]:
    """`stalled_stream`, with the bytes of the response read so far (its first line),
    so that `read_stream_to_end` can read the rest of it later."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps(
        {
            "model": server.model_name,
            "prompt": "the world of music",
            "max_tokens": 220,
            "n": 32,
            "logprobs": 20,  # megabytes of chunks: more than the kernel and uvicorn buffer
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    first = sock.recv(64)
    assert first.startswith(b"HTTP/1.1 200"), first  # admitted and streaming
    return sock, first


@dataclass(frozen=True)
class StreamedResponse:
    """A streamed completion read off the socket: its headers and its SSE events."""

    headers: dict[str, str]
    events: list[dict]  # the JSON chunks, in order
    done: bool  # it ended with `data: [DONE]` and the last (empty) chunk


def read_stream_to_end(
    sock: socket.socket, first: bytes, timeout_s: float = 120
) -> StreamedResponse:
    """Read a chunked streaming response to its end (`first`: the bytes already read),
    within `timeout_s` in all. The stall's tiny receive buffer is made large first: with a
    window under one segment the server's kernel can fall back to zero-window probes, a
    few bytes a minute (a test run hung 17 min that way)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    deadline = time.monotonic() + timeout_s
    data = bytearray(first)
    while not data.endswith(b"\r\n0\r\n\r\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"the stream did not end within {timeout_s:.0f} s ({len(data)} bytes)"
        sock.settimeout(left)
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    assert headers.get("transfer-encoding") == "chunked", headers
    payload, last = bytearray(), False
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            last = True
            break
        payload += body[:size]
        body = body[size + 2 :]
    lines = [x for x in bytes(payload).decode().split("\n") if x.startswith("data: ")]
    done = last and bool(lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(x.removeprefix("data: ")) for x in lines if x != "data: [DONE]"]
    return StreamedResponse(headers, events, done)


def refused_start(server: LocalServer, timeout_s: float = STARTUP_TIMEOUT_S) -> tuple[int, str]:
    """Start a server that must refuse to start and wait until it exits, asking /health
    all along: it must never answer 200 (it would have served). Returns its exit code and
    what it logged during this start."""
    offset = server.log_path.stat().st_size if server.log_path.exists() else 0
    server.start()
    assert server.proc is not None
    deadline = time.monotonic() + timeout_s
    try:
        while (code := server.proc.poll()) is None:
            assert time.monotonic() < deadline, f"still running after {timeout_s:.0f} s"
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{server.url}/health", timeout=2)
                assert r.status_code != 200, "the server answered /health with 200: it started"
            time.sleep(0.5)
    finally:
        server.kill()
    return code, server.log_path.read_bytes()[offset:].decode(errors="replace")


def server_processes(server: ServerProcess) -> dict[int, bytes]:
    """Every process of the server's group (API server, engine core, workers): pid ->
    command line."""
    assert server.proc is not None
    pgid = os.getpgid(server.proc.pid)
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry)) == pgid:
                    found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
    return found


def capital_of_france(base_url: str, model: str) -> str:
    """The greedy chat answer to "What is the capital of France?" (SmolLM2 says Paris,
    in transformers and in vLLM; numerics that drift answer otherwise)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def until(check: Callable[[], object], timeout: float = 300, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what or check}")


def watch_outcome(status: dict, name: str) -> str | None:
    """What the `--watch` folder's report in an /admin/status answer says of file `name`
    (None: not recorded yet). The watcher records a file once its update returned, a
    moment after the new model serves."""
    return status["watch"]["files"].get(name, {}).get("outcome")


def admin_status(server: ServerProcess) -> dict:
    """`GET /admin/status` (with the admin token), which must answer 200."""
    r = httpx.get(f"{server.url}/admin/status", headers=admin_headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()
