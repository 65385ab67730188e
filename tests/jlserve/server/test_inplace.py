"""The in-place apply path (dense weights, as on GPU), on the CPU engine made to keep them.

`--cpu-dense-weights` makes vLLM's CPU backend use its dense fallback GEMM, so workers
take the path GPUs use: sparse (position, value) patches in checkpoint coordinates, each
rank writing its own shard into the existing parameters. Dense and repacked kernels
round differently, so the references are fresh dense servers too.
"""

from __future__ import annotations

import httpx
import pytest

from jlserve.faults import FAULT_ENV
from tests.helpers.serving import ServerProcess, greedy, outputs_only, start_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    flags = ("--insecure-admin", "--cpu-dense-weights")
    main = ServerProcess(
        delta_chain.base,
        root / "state",
        root / "main.log",
        flags,
        env={FAULT_ENV: "mid_apply:raise"},  # the first patch fails half-way, once
    )
    reference = ServerProcess(delta_chain.merged[3], root / "ref-state", root / "ref.log", flags)
    start_all([main, reference])
    yield main, reference
    main.stop()
    reference.stop()


def test_in_place_updates_travel_as_sparse_patches_and_are_exact(dense, delta_chain):
    main, reference = dense
    base_outputs = greedy(main)
    status = httpx.get(f"{main.url}/admin/status").json()
    assert status["apply_path"] == "in_place"
    first = delta_chain.deltas[0].read_bytes()
    r = httpx.post(f"{main.url}/admin/deltas", content=first, timeout=120)
    assert r.status_code == 500 and "InjectedFault" in r.text  # failed between two halves
    assert greedy(main) == base_outputs  # the old values were patched back
    for delta in delta_chain.deltas:
        r = httpx.post(f"{main.url}/admin/deltas", content=delta.read_bytes(), timeout=120)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["apply_path"] == "in_place"
        # only the changed positions travel: an int64 index and a bf16 value each
        assert answer["sent_bytes"] == answer["nnz"] * (8 + 2)
    updated = greedy(main)
    assert outputs_only(updated) == outputs_only(greedy(reference))
    assert outputs_only(updated) != outputs_only(base_outputs)


def test_restart_replays_the_chain_as_patches(dense):
    main, reference = dense
    main.stop()
    main.env = {k: v for k, v in main.env.items() if k != FAULT_ENV}
    start_all([main])
    assert httpx.get(f"{main.url}/admin/status").json()["version"] == 3
    assert outputs_only(greedy(main)) == outputs_only(greedy(reference))


def test_rollback_patches_back_the_union_of_positions(dense, delta_chain):
    main, _ = dense
    r = httpx.post(f"{main.url}/admin/rollback", json={"to_version": 0}, timeout=120)
    assert r.status_code == 200, r.text
    fresh = ServerProcess(
        delta_chain.base,
        main.state_dir.parent / "base-state",
        main.log_path.with_name("b.log"),
        ("--insecure-admin", "--cpu-dense-weights"),
    )
    start_all([fresh])
    try:
        assert outputs_only(greedy(main)) == outputs_only(greedy(fresh))
    finally:
        fresh.stop()
