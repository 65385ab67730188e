"""`jlserve serve` end to end on the real vLLM CPU engine (reload path, drain policy).

One server starts on the base model and receives the delta chain; a second, fresh
server on the merged checkpoint of the last delta is the reference for exactness.
Each test starts from the base model (rollback is exact and takes milliseconds). The
deltas carry no version number: the server accepts a delta whose parent is the served
model and numbers versions itself, never reusing a number.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from jlserve.client import AdminClient
from jlserve.delta import read_delta
from tests.helpers.serving import (
    ADMIN_TOKEN,
    REPACKED_ARGS,
    ServerProcess,
    admin_headers,
    admin_status,
    greedy,
    outputs_only,
    stalled_stream,
    start_all,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    main = ServerProcess(
        delta_chain.base,
        root / "state",
        root / "main.log",
        ("--admin-token-file", str(token_file)),
        engine_args=REPACKED_ARGS,
    )
    reference = ServerProcess(
        delta_chain.merged[3],
        root / "ref-state",
        root / "ref.log",
        ("--insecure-admin",),
        engine_args=REPACKED_ARGS,
    )
    start_all([main, reference])
    yield {"main": main, "reference": reference, "token_file": token_file}
    main.stop()
    reference.stop()


@pytest.fixture(scope="module")
def main(servers) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def base_outputs(main):
    """Greedy outputs of the freshly started server on the base checkpoint (version 0)."""
    return greedy(main)


@pytest.fixture
def at_base(main, base_outputs):
    """Every test starts at version 0."""
    r = httpx.post(
        f"{main.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers(), timeout=120
    )
    assert r.status_code == 200, r.text
    return main


def rollback(server: ServerProcess, **body) -> httpx.Response:
    headers = admin_headers() | body.pop("headers", {})
    return httpx.post(f"{server.url}/admin/rollback", json=body, headers=headers, timeout=120)


def post_delta(server: ServerProcess, path, headers=None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/deltas",
        content=path.read_bytes() if hasattr(path, "read_bytes") else path,
        headers=admin_headers() if headers is None else headers,
        timeout=120,
    )


def test_versionless_diff_chain_matches_a_fresh_server_on_the_merged_checkpoint(
    at_base, servers, delta_chain, base_outputs
):
    before = admin_status(at_base)
    numbers = []
    for delta in delta_chain.deltas:
        r = post_delta(at_base, delta)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["applied"] is True and body["delta_version"] is None
        assert body["version"] == before["next_version"] + len(numbers)  # the server numbers
        assert r.headers["x-jlserve-model-version"] == str(body["version"])
        assert r.headers["x-jlserve-model-fingerprint"] == body["fingerprint"]
        numbers.append(body["version"])
    updated = greedy(at_base)
    fresh = greedy(servers["reference"])
    assert {r["version"] for r in updated} == {str(numbers[-1])}
    assert outputs_only(updated) == outputs_only(fresh)  # token ids, logprobs, top-5: exact
    assert outputs_only(updated) != outputs_only(base_outputs)
    st = admin_status(at_base)
    assert st["version"] == numbers[-1] and st["apply_path"] == "reload"
    assert [e["task"] for e in st["chain"]] == ["task1", "task2", "task3"]
    assert [e["version"] for e in st["chain"]] == numbers
    assert st["fingerprint"] == st["chain"][-1]["fingerprint"]
    assert st["fingerprint"] == admin_status(servers["reference"])["fingerprint"]
    # vLLM's own weight_version label follows the served model
    assert st["engine_weight_version"] == f"{st['version']}:{st['fingerprint']}"


def test_resending_an_applied_delta_answers_applied_false(at_base, delta_chain):
    first = post_delta(at_base, delta_chain.deltas[0])
    assert first.status_code == 200 and first.json()["applied"] is True
    again = post_delta(at_base, delta_chain.deltas[0])  # a client that timed out re-sends
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["applied"] is False
    assert (body["version"], body["fingerprint"]) == (
        first.json()["version"],
        first.json()["fingerprint"],
    )
    assert len(admin_status(at_base)["chain"]) == 1


def test_if_match_is_a_compare_and_swap(at_base, delta_chain, base_outputs):
    base_fp = admin_status(at_base)["fingerprint"]
    other = "sha256:" + "0" * 64
    r = post_delta(at_base, delta_chain.deltas[0], headers=admin_headers() | {"If-Match": other})
    assert r.status_code == 412, r.text
    assert (
        r.json()["error"]["type"] == "precondition_failed"
        and base_fp in r.json()["error"]["message"]
    )
    assert admin_status(at_base)["fingerprint"] == base_fp and greedy(at_base) == base_outputs
    ok = post_delta(at_base, delta_chain.deltas[0], headers=admin_headers() | {"If-Match": base_fp})
    assert ok.status_code == 200 and ok.json()["applied"] is True
    # the same request repeated (If-Match names its parent) is answered as done
    again = post_delta(
        at_base, delta_chain.deltas[0], headers=admin_headers() | {"If-Match": base_fp}
    )
    assert again.status_code == 200 and again.json()["applied"] is False
    # but a rollback guarded by a stale fingerprint is refused
    r = rollback(at_base, to_version=0, headers={"If-Match": other})
    assert r.status_code == 412 and admin_status(at_base)["fingerprint"] == ok.json()["fingerprint"]


def test_a_client_that_times_out_learns_the_update_was_applied(at_base, delta_chain):
    """The swap waits (drain) for a stalled stream; the client gives up first and sends
    the delta again, which is answered by fingerprint once the first attempt is done."""
    reader = stalled_stream(at_base)
    time.sleep(1.0)  # let the server fill the socket buffers and block
    threading.Timer(8.0, reader.close).start()  # the stall ends after the client gave up
    with AdminClient(at_base.url, ADMIN_TOKEN, timeout_s=2.0) as client:
        result = client.update_bytes(delta_chain.deltas[0].read_bytes())
    child = read_delta(delta_chain.deltas[0]).metadata.child_fingerprint
    assert result.note is not None and "no answer within 2 s; sent again" in result.note
    assert result.fingerprint == child == admin_status(at_base)["fingerprint"]
    assert len(admin_status(at_base)["chain"]) == 1  # applied once


def test_rollback_by_fingerprint_or_number_matches_a_fresh_server(
    at_base, delta_chain, base_outputs
):
    applied = [post_delta(at_base, d).json() for d in delta_chain.deltas]
    assert all(a["applied"] for a in applied)
    r = rollback(at_base, to_fingerprint=applied[0]["fingerprint"])
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["applied"] is True
    assert (result["previous_version"], result["previous_fingerprint"]) == (
        applied[2]["version"],
        applied[2]["fingerprint"],
    )
    assert (result["version"], result["fingerprint"]) == (
        applied[0]["version"],
        applied[0]["fingerprint"],
    )
    assert result["timings"]["total_s"] > 0
    r = rollback(at_base, to_version=0)
    assert r.status_code == 200 and r.json()["previous_version"] == applied[0]["version"]
    after = greedy(at_base)
    assert {x["version"] for x in after} == {"0"}
    assert outputs_only(after) == outputs_only(base_outputs)
    st = admin_status(at_base)
    assert st["fingerprint"] == st["base"]["fingerprint"]
    assert rollback(at_base, to_version=0).json()["applied"] is False  # already there
    # numbers are never reused: re-applying gets a new number for the same weights
    again = post_delta(at_base, delta_chain.deltas[0]).json()
    assert again["version"] > applied[2]["version"]
    assert again["fingerprint"] == applied[0]["fingerprint"]
    r = rollback(at_base, to_version=applied[1]["version"])  # no longer in the chain
    assert r.status_code == 409 and "never reused" in r.json()["error"]["message"]


def test_official_openai_client_completions_chat_and_streaming(at_base):
    client = openai.OpenAI(base_url=f"{at_base.url}/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == [at_base.model_name]
    assert "/" not in models.data[0].id  # the checkpoint folder's name, not a server path
    raw = client.completions.with_raw_response.create(
        model=at_base.model_name, prompt="the world", max_tokens=5, temperature=0
    )
    base_fp = admin_status(at_base)["fingerprint"]
    assert raw.headers["x-jlserve-model-version"] == "0"
    assert raw.headers["x-jlserve-model-fingerprint"] == base_fp
    assert raw.parse().choices[0].text
    chat = client.chat.completions.with_raw_response.create(
        model=at_base.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.headers["x-jlserve-model-version"] == "0"
    assert chat.headers["x-jlserve-model-fingerprint"] == base_fp
    assert chat.parse().choices[0].message.content is not None
    stream = client.chat.completions.create(
        model=at_base.model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) >= 8 and "".join(pieces)


@pytest.mark.parametrize(
    ("case", "status_code", "message"),
    [
        ("wrong_parent", 409, "lineage mismatch"),
        ("corrupt", 400, "upload"),
        ("empty", 400, "empty request body"),
        ("wrong_token", 403, "wrong admin token"),
        ("no_token", 401, "missing bearer token"),
        ("not_the_served_parent", 409, "lineage mismatch"),
    ],
)
def test_refused_updates_name_the_problem_and_change_nothing(
    at_base, delta_chain, base_outputs, case, status_code, message
):
    good = delta_chain.deltas[0].read_bytes()
    headers = admin_headers()
    if case == "wrong_parent":  # labelled version 1, but made against merged v1 (not the base)
        body = _relabelled(delta_chain.deltas[1], version=1)
    elif case == "corrupt":
        body = good[: len(good) // 2]
    elif case == "empty":
        body = b""
    elif case == "wrong_token":
        body, headers = good, admin_headers("not-the-admin-token-at-all")
    elif case == "no_token":
        body, headers = good, {}
    else:
        body = delta_chain.deltas[2].read_bytes()
    before = admin_status(at_base)
    r = post_delta(at_base, body, headers=headers)
    assert r.status_code == status_code, r.text
    assert message in r.json()["error"]["message"]
    assert admin_status(at_base)["version"] == 0
    assert admin_status(at_base)["fingerprint"] == before["fingerprint"]
    assert greedy(at_base) == base_outputs


def _relabelled(path, version: int) -> bytes:
    from jlserve.delta import read_delta

    delta = read_delta(path)
    delta.metadata.version = version
    return delta.to_bytes()


def test_inference_api_key_does_not_grant_admin(at_base):
    r = httpx.get(f"{at_base.url}/admin/status", headers={"Authorization": "Bearer sk-inference"})
    assert r.status_code == 403


def test_metrics_expose_version_and_update_latency(at_base, delta_chain):
    r = post_delta(at_base, delta_chain.deltas[0])
    assert r.status_code == 200
    text = httpx.get(f"{at_base.url}/metrics").text
    assert f"jlserve_model_version {float(r.json()['version'])}" in text
    assert 'jlserve_update_duration_seconds_count{operation="apply"}' in text
    assert "vllm:" in text  # vLLM's own metrics are still there


def test_cli_update_status_rollback(at_base, servers, delta_chain):
    env = dict(
        os.environ, JLSERVE_URL=at_base.url, JLSERVE_ADMIN_TOKEN_FILE=str(servers["token_file"])
    )

    def jlserve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "jlserve", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    number = admin_status(at_base)["next_version"]
    done = jlserve("update", "--delta", str(delta_chain.deltas[0]))
    assert done.returncode == 0, done.stderr
    assert f"model version 0 -> {number}" in done.stdout and "swap" in done.stdout
    fingerprint = admin_status(at_base)["fingerprint"]
    again = jlserve("update", "--delta", str(delta_chain.deltas[0]))
    assert again.returncode == 0 and again.stdout.startswith("already served")
    refused = jlserve("update", "--delta", str(delta_chain.deltas[2]))
    assert refused.returncode == 2
    assert "409" in refused.stderr and "lineage mismatch" in refused.stderr
    shown = jlserve("status")
    assert shown.returncode == 0 and shown.stdout.startswith(f"version {number}  {fingerprint}")
    base = admin_status(at_base)["base"]["fingerprint"]
    back = jlserve("rollback", "--to", base)
    assert back.returncode == 0 and f"{number} -> 0" in back.stdout
    no_token = subprocess.run(
        [sys.executable, "-m", "jlserve", "status", "--url", at_base.url],
        env={k: v for k, v in env.items() if not k.startswith("JLSERVE_ADMIN")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_token.returncode == 2 and "missing bearer token" in no_token.stderr


# Long enough that the streams admitted before an update are likely still running when it
# arrives (the tiny model decodes 200 tokens in about a third of a second here).
STREAM_TOKENS = 200
STREAM_PROMPTS = [
    f"{w} of the world and"
    for w in ("music", "news", "sports", "food", "city", "river", "film", "game")
]


@dataclass(frozen=True)
class Streamed:
    """One streamed completion: its prompt, the model it was admitted under, its text."""

    prompt: str
    status: int
    fingerprint: str
    text: str


async def _stream(
    client: openai.AsyncOpenAI,
    model: str,
    prompt: str,
    delay: float = 0.0,
    admitted: asyncio.Event | None = None,
) -> Streamed:
    """Stream one completion of STREAM_TOKENS after `delay` s; set `admitted` once its
    headers came (the server admitted it and named the model serving it), or it failed."""
    await asyncio.sleep(delay)
    try:
        raw = await client.completions.with_raw_response.create(
            model=model,
            prompt=prompt,
            max_tokens=STREAM_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    finally:
        if admitted is not None:
            admitted.set()
    text = "".join([chunk.choices[0].text async for chunk in raw.parse() if chunk.choices])
    fingerprint = raw.headers["x-jlserve-model-fingerprint"]
    return Streamed(prompt, raw.http_response.status_code, fingerprint, text)


STREAMS_PER_STEP = 4


async def _streams_during_updates(server: ServerProcess, deltas) -> list[Streamed]:
    """Post `deltas` one after another while streams run, in a fixed order rather than on
    timers (a client or server that lags must not let every request land on one model):
    STREAMS_PER_STEP streams admitted under the starting model before the first update is
    posted, then as many launched (50 ms apart) beside each update's POST. The first ones
    are served by the starting model and every stream launched after the first update's
    answer by a later one, so the responses always span at least two models."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    requests: list[asyncio.Task[Streamed]] = []

    def launch(delays: list[float], admitted: list[asyncio.Event] | None = None) -> None:
        start = len(requests)
        for j, delay in enumerate(delays):
            prompt = STREAM_PROMPTS[(start + j) % len(STREAM_PROMPTS)]
            event = admitted[j] if admitted else None
            requests.append(
                asyncio.create_task(_stream(client, server.model_name, prompt, delay, event))
            )

    first = [asyncio.Event() for _ in range(STREAMS_PER_STEP)]
    launch([0.0] * STREAMS_PER_STEP, first)
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in first)), 120)
    async with httpx.AsyncClient(timeout=120) as http:
        for delta in deltas:
            launch([0.05 * j for j in range(STREAMS_PER_STEP)])
            r = await http.post(
                f"{server.url}/admin/deltas", content=delta.read_bytes(), headers=admin_headers()
            )
            assert r.status_code == 200, r.text
    results = await asyncio.gather(*requests)
    await client.close()
    return results


async def _reference_texts(server: ServerProcess) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
    done = await asyncio.gather(*(_stream(client, server.model_name, p) for p in STREAM_PROMPTS))
    await client.close()
    return {p: r.text for p, r in zip(STREAM_PROMPTS, done, strict=True)}


def test_concurrent_streams_during_three_updates_all_complete_on_one_version(at_base, delta_chain):
    # What each model answers, to check that every response came from a single model.
    expected = {admin_status(at_base)["fingerprint"]: asyncio.run(_reference_texts(at_base))}
    for delta in delta_chain.deltas:
        assert post_delta(at_base, delta).status_code == 200
        expected[admin_status(at_base)["fingerprint"]] = asyncio.run(_reference_texts(at_base))
    assert len({tuple(e.values()) for e in expected.values()}) == 4  # models differ
    assert rollback(at_base, to_version=0).status_code == 200

    results = asyncio.run(_streams_during_updates(at_base, delta_chain.deltas))

    assert [r.status for r in results] == [200] * STREAMS_PER_STEP * (1 + len(delta_chain.deltas))
    starting = next(iter(expected))
    assert {r.fingerprint for r in results[:STREAMS_PER_STEP]} == {starting}
    assert starting not in {r.fingerprint for r in results[2 * STREAMS_PER_STEP :]}
    # drain: every response is the text of the model it was admitted under; one that ran
    # across a swap (frozen, resumed on the new weights) is not (test_watch_restart's
    # preempt test sees such texts)
    for i, r in enumerate(results):
        assert r.text == expected[r.fingerprint][r.prompt], i
    assert admin_status(at_base)["fingerprint"] == list(expected)[-1]
