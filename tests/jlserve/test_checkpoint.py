"""Checkpoint I/O: fingerprints are exact and incremental, writes are atomic and keep sharding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from jlserve.checkpoint import (
    TensorDigests,
    fingerprint,
    load_tensors,
    weight_files,
    write_checkpoint,
)
from jlserve.errors import CheckpointError


def test_fingerprint_sees_a_single_bit(tiny_model_dir):
    tensors = load_tensors(tiny_model_dir)
    name = "model.layers.1.mlp.up_proj.weight"
    flipped = tensors[name].clone()
    flipped.view(torch.int16).view(-1)[5] ^= 1
    assert fingerprint(tensors) != fingerprint({**tensors, name: flipped})
    assert fingerprint(tensors).startswith("sha256:") and len(fingerprint(tensors)) == 7 + 64


def test_fingerprint_depends_on_dtype_and_shape_not_only_bytes():
    a = {"w": torch.zeros(4, dtype=torch.float32)}
    assert fingerprint(a) != fingerprint({"w": torch.zeros(2, 2, dtype=torch.float32)})
    assert fingerprint(a) != fingerprint({"w": torch.zeros(8, dtype=torch.bfloat16)})


def test_incremental_digests_equal_a_full_recompute(tiny_model_dir):
    tensors = load_tensors(tiny_model_dir)
    digests = TensorDigests(tensors)
    name = "model.layers.0.self_attn.v_proj.weight"
    changed = {name: tensors[name] * 2}
    updated = digests.updated(changed)
    assert updated.fingerprint == fingerprint({**tensors, **changed})
    assert digests.fingerprint == fingerprint(tensors)  # the original is untouched


def test_write_keeps_sharding_and_files(tiny_model_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / extra).write_bytes((tiny_model_dir / extra).read_bytes())
    assert len(weight_files(sharded)) > 1
    tensors = load_tensors(sharded)
    write_checkpoint(tensors, tmp_path / "copy", like=sharded)
    assert [p.name for p in weight_files(tmp_path / "copy")] == [
        p.name for p in weight_files(sharded)
    ]
    assert fingerprint(load_tensors(tmp_path / "copy")) == fingerprint(tensors)
    assert (tmp_path / "copy" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "copy" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_failed_write_leaves_nothing(tiny_model_dir, tmp_path):
    tensors = load_tensors(tiny_model_dir)
    tensors["not.in.layout"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="not in the reference layout"):
        write_checkpoint(tensors, tmp_path / "out", like=tiny_model_dir)
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_tensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage!")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        load_tensors(tmp_path)
