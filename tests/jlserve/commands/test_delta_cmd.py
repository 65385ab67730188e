"""`jlserve delta diff|apply|revert|inspect` through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from jlserve.checkpoint import TensorDigests, fingerprint, load_tensors, write_checkpoint
from jlserve.cli import main
from jlserve.delta import plan_update
from tests.helpers.bad_deltas import (
    FORMAT_CASES,
    MODEL_CASES,
    format_errors,
    good_delta,
    model_errors,
)


def tree_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def chain(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """Checkpoints v0 (the tiny model) .. v2, each a sparse change of the one before."""
    root = tmp_path_factory.mktemp("chain")
    dirs = [tiny_model_dir]
    tensors = load_tensors(tiny_model_dir)
    for k in (1, 2):
        planned = plan_update(tensors, TensorDigests(tensors), good_delta(tensors, seed=k))
        tensors = {**tensors, **planned.changed}
        out = root / f"v{k}"
        write_checkpoint(tensors, out, like=tiny_model_dir)
        dirs.append(out)
    return dirs


def test_diff_apply_revert_round_trip(capsys, chain, tmp_path):
    """A v1 and a v2 delta in one chain: applied, then reverted, bit for bit."""
    v0, v1, v2 = chain
    d1, d2 = tmp_path / "d1.safetensors", tmp_path / "d2.safetensors"
    code, out, _ = run(
        capsys, "delta", "diff", "--base", v0, "--target", v1, "--out", d1, "--format", "v1"
    )
    assert code == 0 and "(format v1)" in out
    code, out, _ = run(capsys, "delta", "diff", "--base", v1, "--target", v2, "--out", d2)
    assert code == 0 and "changed coordinates" in out and "(format v2)" in out
    # no --version needed: lineage is enough

    assert (
        run(
            capsys,
            "delta",
            "apply",
            "--model",
            v0,
            "--delta",
            d1,
            "--delta",
            d2,
            "--out",
            tmp_path / "m2",
        )[0]
        == 0
    )
    applied = load_tensors(tmp_path / "m2")
    expected = load_tensors(v2)
    assert all(torch.equal(applied[n], expected[n]) for n in expected)
    # the non-weight files travel with the checkpoint
    assert (tmp_path / "m2" / "tokenizer.json").read_bytes() == (v0 / "tokenizer.json").read_bytes()

    code, out, _ = run(
        capsys,
        "delta",
        "revert",
        "--model",
        tmp_path / "m2",
        "--delta",
        d1,
        "--delta",
        d2,
        "--out",
        tmp_path / "m0",
    )
    assert code == 0
    assert fingerprint(load_tensors(tmp_path / "m0")) == fingerprint(load_tensors(v0))
    reverted, original = load_tensors(tmp_path / "m0"), load_tensors(v0)
    assert all(torch.equal(reverted[n], original[n]) for n in original)


def test_inspect_reports_metadata_density_and_size(capsys, chain, tmp_path):
    v0, v1, _ = chain
    d1 = tmp_path / "d1.safetensors"
    run(capsys, "delta", "diff", "--base", v0, "--target", v1, "--out", d1, "--task", "news")
    code, out, _ = run(capsys, "delta", "inspect", d1, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["metadata"]["task"] == "news" and info["metadata"]["version"] is None
    assert info["format"] == "v2" and info["encoding"]["positions"] == "gap-varint"
    # 10 coordinates ~1 in 400 apart: one- or two-byte gaps + bf16 XORs, no zstd (too few)
    enc = info["encoding"]
    assert info["nnz"] == 10 and enc["values_bytes"] == 20
    assert info["payload_bytes"] == enc["positions_bytes"] + enc["values_bytes"]
    assert info["payload_bytes_per_changed_coordinate"] <= 4
    assert info["file_bytes"] == d1.stat().st_size
    code, out, _ = run(capsys, "delta", "inspect", d1)
    assert code == 0 and "q_proj" in out and "bytes per changed coordinate" in out
    assert "format v2" in out and "encoding: positions gap-varint" in out


def test_format_v1_is_still_written_on_request(capsys, chain, tmp_path):
    v0, v1, _ = chain
    d1 = tmp_path / "d1.safetensors"
    run(capsys, "delta", "diff", "--base", v0, "--target", v1, "--out", d1, "--format", "v1")
    _, out, _ = run(capsys, "delta", "inspect", d1, "--json")
    info = json.loads(out)
    assert info["format"] == "v1" and info["payload_bytes_per_changed_coordinate"] == 8


def test_apply_refuses_the_wrong_parent_and_writes_nothing(capsys, chain, tmp_path):
    v0, v1, v2 = chain
    d2 = tmp_path / "d2.safetensors"
    run(capsys, "delta", "diff", "--base", v1, "--target", v2, "--out", d2, "--version", 2)
    assert "labelled version 2" in run(capsys, "delta", "inspect", d2)[1]  # advisory label
    before = tree_hash(v0)
    code, _, err = run(
        capsys, "delta", "apply", "--model", v0, "--delta", d2, "--out", tmp_path / "out"
    )
    assert code == 2
    assert err.count("\n") == 1 and "lineage mismatch" in err
    assert fingerprint(load_tensors(v0)) in err
    assert not (tmp_path / "out").exists()
    assert tree_hash(v0) == before


def test_existing_output_is_never_overwritten(capsys, chain, tmp_path):
    v0, v1, _ = chain
    d1 = tmp_path / "d1.safetensors"
    run(capsys, "delta", "diff", "--base", v0, "--target", v1, "--out", d1)
    code, _, err = run(capsys, "delta", "apply", "--model", v0, "--delta", d1, "--out", v1)
    assert code == 2 and "not empty" in err


def test_missing_model_dir_is_one_line(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "delta",
        "diff",
        "--base",
        tmp_path / "nope",
        "--target",
        tmp_path,
        "--out",
        tmp_path / "d",
    )
    assert code == 2 and "not a directory" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def model_copy(tiny_model_dir, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("name", FORMAT_CASES + MODEL_CASES)
def test_every_bad_delta_is_refused_and_changes_nothing(capsys, name, model_copy, tmp_path):
    delta = good_delta(load_tensors(model_copy))
    case = {c.name: c for c in format_errors(delta) + model_errors(delta)}[name]
    bad = tmp_path / f"{name}.safetensors"
    bad.write_bytes(case.data)
    before = tree_hash(model_copy)
    code, _out, err = run(
        capsys, "delta", "apply", "--model", model_copy, "--delta", bad, "--out", tmp_path / "out"
    )
    assert code == 2
    assert err.startswith("jlserve: error: ") and err.count("\n") == 1
    assert str(bad) in err and case.message in err
    assert not (tmp_path / "out").exists()
    assert tree_hash(model_copy) == before
