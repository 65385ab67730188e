"""Shared by the serving and engine tests: a chain of three deltas on the tiny model and the
merged checkpoint of each version.

The deltas mix the file formats (v2, v1, v2), so every serving test that walks the chain
(apply, rollback, restart, watch) meets both. They carry no version number, as `jlserve
delta diff` writes them: the server orders them by lineage (parent fingerprint) and
numbers versions itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from jlserve.checkpoint import load_tensors, write_checkpoint
from jlserve.delta import diff_tensors, write_delta

# Each version touches different matrices, so every fused group (qkv, gate_up) and the
# unfused tensors (norms, embeddings, lm_head) are exercised.
FORMATS = (2, 1, 2)  # the delta file format of each version
TOUCHED = (
    (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
    ),
    (
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
    ),
    (
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.norm.weight",
    ),
)


@dataclass(frozen=True)
class DeltaChain:
    base: Path
    deltas: list[Path]  # deltas[i] takes merged[i] to merged[i + 1]
    merged: list[Path]  # merged[i] is the checkpoint after i deltas (merged[0] is base)


@pytest.fixture(scope="session")
def delta_chain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DeltaChain:
    root = tmp_path_factory.mktemp("chain")
    gen = torch.Generator().manual_seed(7)
    current = load_tensors(tiny_model_dir)
    deltas, merged = [], [tiny_model_dir]
    for version, names in enumerate(TOUCHED, start=1):
        target = dict(current)
        for name in names:
            flat = current[name].reshape(-1).clone()
            idx = torch.randperm(flat.numel(), generator=gen)[: max(8, flat.numel() // 10)]
            flat[idx] += torch.randn(idx.numel(), generator=gen).to(flat.dtype)
            target[name] = flat.view(current[name].shape)
        path = root / f"task{version}.safetensors"
        delta = diff_tensors(current, target, task=f"task{version}")
        write_delta(delta, path, format_version=FORMATS[version - 1])
        out = root / f"merged-v{version}"
        write_checkpoint(target, out, like=tiny_model_dir)
        deltas.append(path)
        merged.append(out)
        current = target
    return DeltaChain(base=tiny_model_dir, deltas=deltas, merged=merged)
