"""Data parallel: two engines behind one API server both take every swap.

vLLM's `collective_rpc` answers with the first engine's result only when data parallel
> 1; the engine adapter gathers every engine's reports. Requests are spread over both
engines, so one stale engine would show as a second, different answer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers.serving import REPACKED_ARGS, ServerProcess, start_all

pytestmark = pytest.mark.slow

PROMPT = "the world of music"


@pytest.fixture(scope="module")
def servers(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    two = ServerProcess(
        delta_chain.base,
        root / "state",
        root / "dp.log",
        ("--insecure-admin",),
        engine_args=("--data-parallel-size", "2", *REPACKED_ARGS),
    )
    fresh = ServerProcess(
        delta_chain.merged[1],
        root / "ref",
        root / "ref.log",
        ("--insecure-admin",),
        engine_args=REPACKED_ARGS,
    )
    start_all([two, fresh])
    yield two, fresh
    two.stop()
    fresh.stop()


def answers(server: ServerProcess, n: int = 16) -> set[str]:
    """Greedy answers of `n` concurrent identical requests (spread over the engines)."""

    def ask(_: int) -> str:
        body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(ask, range(n)))


def test_every_engine_takes_the_swap(servers, delta_chain):
    two, fresh = servers
    assert httpx.get(f"{two.url}/admin/status").json()["engine_workers"] == 2
    before = answers(two)
    r = httpx.post(
        f"{two.url}/admin/deltas", content=delta_chain.deltas[0].read_bytes(), timeout=120
    )
    assert r.status_code == 200, r.text
    after = answers(two)
    assert after == answers(fresh, 1) and after != before
    log = two.log_path.read_text()
    assert log.count("Reloading weights inplace") == 2  # one worker in each engine
