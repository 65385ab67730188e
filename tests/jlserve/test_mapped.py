"""The base checkpoint memory-mapped: the same tensors as safetensors gives, read-only,
no private copy (measured in a fresh process on a checkpoint no other process maps)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jlserve.checkpoint import INDEX_FILE, load_tensors, write_checkpoint
from jlserve.errors import CheckpointError
from jlserve.mapped import MappedCheckpoint

REPO = Path(__file__).resolve().parents[2]


def test_mapped_tensors_equal_safetensors_bit_for_bit(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.randn(7, 5).to(torch.bfloat16),
        "b.weight": torch.randn(3).to(torch.float16),
        "c.weight": torch.randn(2, 2, 2),
        "d.count": torch.arange(5, dtype=torch.int64),
        "e.empty": torch.empty(0, 4),
        "f.mask": torch.tensor([True, False, True]),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    mapped = MappedCheckpoint(tmp_path)
    assert set(mapped) == set(tensors)
    for name, t in tensors.items():
        m = mapped[name]
        assert m.dtype == t.dtype and m.shape == t.shape
        assert torch.equal(m.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))


def test_sharded_checkpoint_maps_every_shard(tiny_model_dir: Path, tmp_path: Path) -> None:
    tensors = load_tensors(tiny_model_dir)
    names = sorted(tensors)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({n: tensors[n] for n in part}, str(tmp_path / f"model-{i}.safetensors"))
    weight_map = {n: f"model-{int(i >= half)}.safetensors" for i, n in enumerate(names)}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    mapped = MappedCheckpoint(tmp_path)
    assert {n: mapped.files[n].name for n in names} == weight_map
    assert all(torch.equal(mapped[n], tensors[n]) for n in names)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 6]}}, "do not fit"),
        ({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 800]}}, "do not fit"),
        ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 8]}}, "unsupported"),
        ({"w": {"shape": [4]}}, "malformed"),
    ],
)
def test_malformed_headers_are_refused_by_name(tmp_path: Path, header: dict, problem: str) -> None:
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match=problem):
        MappedCheckpoint(tmp_path)


USS_PROBE = """
import sys, psutil, torch
from pathlib import Path
from jlserve.checkpoint import TensorDigests, load_tensors
from jlserve.digest_cache import base_digests
from jlserve.mapped import MappedCheckpoint

model, how = Path(sys.argv[1]), sys.argv[2]
proc = psutil.Process()
before = proc.memory_full_info().uss
if how == "mapped":  # what the server does at start
    tensors = MappedCheckpoint(model)
    digests, _, _ = base_digests(tensors, model.parent / "state")
else:  # the previous way: safetensors' tensors, hashed in place
    tensors = load_tensors(model)
    digests = TensorDigests(tensors)
print(proc.memory_full_info().uss - before)
"""


def _uss_growth(model: Path, how: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", USS_PROBE, str(model), how],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_opening_and_hashing_the_base_leaves_no_private_copy(tmp_path: Path) -> None:
    """A fresh 96 MiB checkpoint that no other process maps: after the server's open +
    hash, the process's unique set size grew by < 10 % of it. The control (tensors kept
    resident after hashing, as before) grows by most of it, so the probe can fail."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(2048, 1024, generator=gen) for i in range(12)}
    write_checkpoint(tensors, tmp_path / "model")
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert _uss_growth(tmp_path / "model", "mapped") < 0.10 * size
    assert _uss_growth(tmp_path / "model", "resident") > 0.50 * size
