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
