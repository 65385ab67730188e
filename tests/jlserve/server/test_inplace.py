"""The in-place apply path (dense weights, as on GPU), on the CPU engine made to keep them.

`--cpu-dense-weights` makes vLLM's CPU backend use its dense fallback GEMM, so workers
take the path GPUs use: each rank's slice written into the existing parameters. Dense
and repacked kernels round differently, so the reference is a fresh dense server too.
"""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.serving import ServerProcess, greedy, outputs_only, start_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    flags = ("--insecure-admin", "--cpu-dense-weights")
    main = ServerProcess(delta_chain.base, root / "state", root / "main.log", flags)
    reference = ServerProcess(delta_chain.merged[3], root / "ref-state", root / "ref.log", flags)
    start_all([main, reference])
    yield main, reference
    main.stop()
    reference.stop()


def test_in_place_updates_and_rollback_are_exact(dense, delta_chain):
    main, reference = dense
    base_outputs = greedy(main)
    status = httpx.get(f"{main.url}/admin/status").json()
    assert status["apply_path"] == "in_place"
    for delta in delta_chain.deltas:
        r = httpx.post(f"{main.url}/admin/deltas", content=delta.read_bytes(), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["apply_path"] == "in_place"
    updated = greedy(main)
    assert outputs_only(updated) == outputs_only(greedy(reference))
    assert outputs_only(updated) != outputs_only(base_outputs)
    r = httpx.post(f"{main.url}/admin/rollback", json={"to_version": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert greedy(main) == base_outputs
