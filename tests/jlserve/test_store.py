"""The version store: atomic state, refusal of a foreign base, rollback bookkeeping."""

from __future__ import annotations

import json

import pytest

from jlserve.errors import StateError
from jlserve.store import ROLLED_BACK_DIR, STATE_FILE, ChainEntry, VersionStore, utc_now

BASE_FP = "sha256:" + "0" * 64


def fp(i: int) -> str:
    return "sha256:" + f"{i:x}" * 64


def apply(store: VersionStore, version: int) -> ChainEntry:
    file = store.stage_delta(version, fp(version), f"delta {version}".encode())
    entry = ChainEntry(
        version=version,
        task=f"t{version}",
        fingerprint=fp(version),
        file=file,
        nnz=3,
        applied_at=utc_now(),
    )
    store.commit_apply(entry, seconds=0.1)
    return entry


def test_new_store_is_at_version_zero_and_survives_reopening(tmp_path):
    store = VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)
    assert (store.version, store.fingerprint) == (0, BASE_FP)
    apply(store, 1)
    apply(store, 2)
    again = VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)
    assert again.version == 2 and again.fingerprint == fp(2)
    assert again.read_delta_bytes(again.chain[0]) == b"delta 1"
    assert [e.event for e in again.history] == ["apply", "apply"]


def test_state_of_another_base_checkpoint_is_refused(tmp_path):
    VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)
    with pytest.raises(StateError, match="belongs to base checkpoint"):
        VersionStore.open(tmp_path / "s", tmp_path / "other", fp(9))


def test_rollback_truncates_the_chain_and_keeps_undone_files_aside(tmp_path):
    store = VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)
    for v in (1, 2, 3):
        apply(store, v)
    store.commit_rollback(1, seconds=0.05)
    assert store.version == 1 and store.fingerprint == fp(1)
    assert len(list((tmp_path / "s" / ROLLED_BACK_DIR).iterdir())) == 2
    assert store.history[-1].event == "rollback" and store.history[-1].from_version == 3
    on_disk = json.loads((tmp_path / "s" / STATE_FILE).read_text())
    assert [e["version"] for e in on_disk["chain"]] == [1]


def test_an_unstaged_file_is_not_a_version_and_a_corrupt_state_is_refused(tmp_path):
    store = VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)
    store.stage_delta(1, fp(1), b"staged, never committed")  # a crash before commit
    assert VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP).version == 0
    (tmp_path / "s" / STATE_FILE).write_text("{not json")
    with pytest.raises(StateError, match="unreadable state file"):
        VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)


def test_version_numbers_are_never_reused_even_across_reopening(tmp_path):
    store = VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP)
    for v in (1, 2, 3):
        apply(store, v)
    store.commit_rollback(1, seconds=0.05)
    assert store.next_version == 4
    assert VersionStore.open(tmp_path / "s", tmp_path / "model", BASE_FP).next_version == 4
    assert (store.version_of(fp(1)), store.version_of(BASE_FP), store.version_of(fp(3))) == (
        1,
        0,
        None,
    )


def test_a_state_file_written_before_contract_v2_still_loads(tmp_path):
    """No `last_version`, no parent fingerprints: the highest number comes from history."""
    root = tmp_path / "s"
    (root / "deltas").mkdir(parents=True)
    old = {
        "format": "jlserve.state",
        "format_version": 1,
        "base": {"path": str(tmp_path / "model"), "fingerprint": BASE_FP},
        "chain": [
            {"version": 1, "task": "t1", "fingerprint": fp(1), "file": "deltas/v1",
             "nnz": 3, "applied_at": utc_now()}
        ],
        "history": [
            {"event": "apply", "version": 1, "from_version": 0, "fingerprint": fp(1),
             "task": "t1", "seconds": 0.1, "at": utc_now()},
            {"event": "apply", "version": 2, "from_version": 1, "fingerprint": fp(2),
             "task": "t2", "seconds": 0.1, "at": utc_now()},
            {"event": "rollback", "version": 1, "from_version": 2, "fingerprint": fp(1),
             "seconds": 0.1, "at": utc_now()},
        ],
    }  # fmt: skip
    (root / STATE_FILE).write_text(json.dumps(old))
    store = VersionStore.open(root, tmp_path / "model", BASE_FP)
    assert (store.version, store.fingerprint, store.next_version) == (1, fp(1), 3)
