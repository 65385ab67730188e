"""`jlserve serve` end to end on the real vLLM CPU engine (reload path, drain policy).

One server starts on the base model and receives the delta chain; a second, fresh
server on the merged checkpoint of the last version is the reference for exactness.
Each test starts from version 0 (rollback is exact and takes milliseconds).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    greedy,
    outputs_only,
    start_all,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    main = ServerProcess(
        delta_chain.base, root / "state", root / "main.log", ("--admin-token-file", str(token_file))
    )
    reference = ServerProcess(
        delta_chain.merged[3], root / "ref-state", root / "ref.log", ("--insecure-admin",)
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
    r = httpx.post(f"{main.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers())
    assert r.status_code == 200, r.text
    return main


def post_delta(server: ServerProcess, path, headers=None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/deltas",
        content=path.read_bytes() if hasattr(path, "read_bytes") else path,
        headers=admin_headers() if headers is None else headers,
        timeout=120,
    )


def status(server: ServerProcess) -> dict:
    r = httpx.get(f"{server.url}/admin/status", headers=admin_headers())
    assert r.status_code == 200, r.text
    return r.json()


def test_updates_match_a_fresh_server_on_the_merged_checkpoint(
    at_base, servers, delta_chain, base_outputs
):
    for version, delta in enumerate(delta_chain.deltas, start=1):
        r = post_delta(at_base, delta)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == version
        assert r.headers["x-jlserve-model-version"] == str(version)
    updated = greedy(at_base)
    fresh = greedy(servers["reference"])
    assert {r["version"] for r in updated} == {"3"}
    assert outputs_only(updated) == outputs_only(fresh)  # token ids, logprobs, top-5: exact
    assert outputs_only(updated) != outputs_only(base_outputs)
    st = status(at_base)
    assert st["version"] == 3 and st["apply_path"] == "reload"
    assert [e["task"] for e in st["chain"]] == ["task1", "task2", "task3"]
    assert st["fingerprint"] == st["chain"][-1]["fingerprint"]


def test_rollback_matches_a_fresh_server_on_that_version(at_base, delta_chain, base_outputs):
    for delta in delta_chain.deltas:
        assert post_delta(at_base, delta).status_code == 200
    r = httpx.post(f"{at_base.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json()["previous_version"] == 3 and r.json()["version"] == 0
    after = greedy(at_base)
    assert {x["version"] for x in after} == {"0"}
    assert outputs_only(after) == outputs_only(base_outputs)
    assert status(at_base)["fingerprint"] == status(at_base)["base"]["fingerprint"]


def test_official_openai_client_completions_chat_and_streaming(at_base):
    client = openai.OpenAI(base_url=f"{at_base.url}/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == [at_base.model_name]
    raw = client.completions.with_raw_response.create(
        model=at_base.model_name, prompt="the world", max_tokens=5, temperature=0
    )
    assert raw.headers["x-jlserve-model-version"] == "0"
    assert raw.parse().choices[0].text
    chat = client.chat.completions.create(
        model=at_base.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content is not None
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
        ("stale_version", 409, "accepts only version 1"),
    ],
)
def test_refused_updates_name_the_problem_and_change_nothing(
    at_base, delta_chain, base_outputs, case, status_code, message
):
    good = delta_chain.deltas[0].read_bytes()
    headers = admin_headers()
    if case == "wrong_parent":  # version 1, but made against merged v1 (not the base)
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
    before = status(at_base)
    r = post_delta(at_base, body, headers=headers)
    assert r.status_code == status_code, r.text
    assert message in r.json()["error"]["message"]
    assert status(at_base)["version"] == 0
    assert status(at_base)["fingerprint"] == before["fingerprint"]
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
    assert post_delta(at_base, delta_chain.deltas[0]).status_code == 200
    text = httpx.get(f"{at_base.url}/metrics").text
    assert "jlserve_model_version 1.0" in text
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

    done = jlserve("update", "--delta", str(delta_chain.deltas[0]))
    assert done.returncode == 0, done.stderr
    assert "model version 0 -> 1" in done.stdout and "swap" in done.stdout
    refused = jlserve("update", "--delta", str(delta_chain.deltas[2]))
    assert refused.returncode == 2
    assert "409" in refused.stderr and "accepts only version 2" in refused.stderr
    shown = jlserve("status")
    assert shown.returncode == 0 and shown.stdout.startswith("version 1")
    back = jlserve("rollback", "--to", "0")
    assert back.returncode == 0 and "-> 0" in back.stdout
    no_token = subprocess.run(
        [sys.executable, "-m", "jlserve", "status", "--url", at_base.url],
        env={k: v for k, v in env.items() if not k.startswith("JLSERVE_ADMIN")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_token.returncode == 2 and "missing bearer token" in no_token.stderr


STREAM_PROMPTS = [
    f"{w} of the world and"
    for w in ("music", "news", "sports", "food", "city", "river", "film", "game")
]


async def _stream(
    client: openai.AsyncOpenAI, model: str, prompt: str, delay: float
) -> tuple[int, str, str]:
    await asyncio.sleep(delay)
    raw = await client.completions.with_raw_response.create(
        model=model,
        prompt=prompt,
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join([chunk.choices[0].text async for chunk in raw.parse() if chunk.choices])
    return raw.http_response.status_code, raw.headers["x-jlserve-model-version"], text


async def _streams_during_updates(server: ServerProcess, deltas) -> list[tuple[int, str, str]]:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    requests = [
        asyncio.create_task(_stream(client, server.model_name, STREAM_PROMPTS[i % 8], 0.05 * i))
        for i in range(16)
    ]
    async with httpx.AsyncClient(timeout=120) as http:
        for delta in deltas:
            await asyncio.sleep(0.2)
            r = await http.post(
                f"{server.url}/admin/deltas", content=delta.read_bytes(), headers=admin_headers()
            )
            assert r.status_code == 200, r.text
    results = await asyncio.gather(*requests)
    await client.close()
    return results


async def _reference_texts(server: ServerProcess) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
    done = await asyncio.gather(*(_stream(client, server.model_name, p, 0) for p in STREAM_PROMPTS))
    await client.close()
    return {p: text for p, (_s, _v, text) in zip(STREAM_PROMPTS, done, strict=True)}


def test_concurrent_streams_during_three_updates_all_complete_on_one_version(at_base, delta_chain):
    # What each version answers, to check that every response came from a single version.
    expected = {"0": asyncio.run(_reference_texts(at_base))}
    for version, delta in enumerate(delta_chain.deltas, start=1):
        assert post_delta(at_base, delta).status_code == 200
        expected[str(version)] = asyncio.run(_reference_texts(at_base))
    assert len({tuple(e.values()) for e in expected.values()}) == 4  # versions differ
    httpx.post(f"{at_base.url}/admin/rollback", json={"to_version": 0}, headers=admin_headers())

    results = asyncio.run(_streams_during_updates(at_base, delta_chain.deltas))

    assert [s for s, _v, _t in results] == [200] * 16
    versions = [v for _s, v, _t in results]
    assert len(set(versions)) >= 2, versions  # the requests really overlapped the swaps
    for i, (_s, version, text) in enumerate(results):
        assert text == expected[version][STREAM_PROMPTS[i % 8]], (i, version)
    assert status(at_base)["version"] == 3
