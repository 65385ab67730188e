"""The base digest cache: trusted only while a file's size, mtime and header are
unchanged; re-hashes (and says why) otherwise; never changes the fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from jlserve.checkpoint import fingerprint, load_tensors, write_checkpoint
from jlserve.digest_cache import CACHE_FILE, base_digests, save_cache
from jlserve.mapped import MappedCheckpoint


@pytest.fixture
def model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    write_checkpoint(load_tensors(tiny_model_dir), out, like=tiny_model_dir)
    return out


def _open(model: Path, state: Path, force: bool = False):
    digests, report, cache = base_digests(MappedCheckpoint(model), state, force=force)
    state.mkdir(exist_ok=True)
    save_cache(state, cache)
    return digests, report


def test_first_start_hashes_then_restarts_use_the_cache(model: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    digests, report = _open(model, state)
    assert report.rehashed == {"model.safetensors": "no digest cache"} and not report.cached
    assert digests.fingerprint == fingerprint(load_tensors(model))
    again, report = _open(model, state)
    assert report.cached == ["model.safetensors"] and not report.rehashed
    assert again.fingerprint == digests.fingerprint


def test_a_changed_file_is_rehashed_with_the_reason(model: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    digests, _ = _open(model, state)
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again, report = _open(model, state)
    assert report.rehashed == {
        "model.safetensors": "mtime_ns changed since the digests were cached"
    }
    assert again.fingerprint == digests.fingerprint  # same bytes


def test_new_weights_under_a_restored_mtime_are_caught_by_size_or_header(
    model: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    digests, _ = _open(model, state)
    weights = model / "model.safetensors"
    st = weights.stat()
    tensors = load_tensors(model)
    name = sorted(tensors)[0]
    tensors[name] = torch.cat([tensors[name].reshape(-1), tensors[name].reshape(-1)[:1]])
    os.remove(weights)
    write_checkpoint(tensors, tmp_path / "rewritten")
    os.replace(tmp_path / "rewritten" / "model.safetensors", weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    again, report = _open(model, state)
    assert "changed since the digests were cached" in report.rehashed["model.safetensors"]
    assert again.fingerprint == fingerprint(load_tensors(model)) != digests.fingerprint


def test_unreadable_cache_and_rehash_flag_fall_back_to_hashing(model: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    digests, _ = _open(model, state)
    _, report = _open(model, state, force=True)
    assert report.rehashed == {"model.safetensors": "--rehash-base"}
    (state / CACHE_FILE).write_text('{"format": "jlserve.base_digests", "files": {"x": 1}}')
    again, report = _open(model, state)
    assert report.rehashed == {"model.safetensors": "no digest cache"}
    assert again.fingerprint == digests.fingerprint
