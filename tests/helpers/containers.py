"""What the container tests share: podman, and deltas made on the host's SmolLM2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from jlserve.checkpoint import load_tensors
from jlserve.delta import diff_tensors, write_delta


def podman(*args: str, check: bool = True) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"podman {args}: {result.stderr[-2000:]}"
    return result.stdout + (result.stderr if not check else "")


def smollm2_deltas(smollm2_dir: Path, out: Path) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """Two chained deltas on SmolLM2 (final norm, then part of one MLP matrix), and the
    weights they lead to."""
    current = load_tensors(smollm2_dir)
    gen = torch.Generator().manual_seed(13)
    paths = []
    for version, name in enumerate(
        ("model.norm.weight", "model.layers.3.mlp.down_proj.weight"), start=1
    ):
        target = dict(current)
        flat = current[name].reshape(-1).clone()
        idx = torch.randperm(flat.numel(), generator=gen)[:4096]
        flat[idx] += (0.05 * torch.randn(idx.numel(), generator=gen)).to(flat.dtype)
        target[name] = flat.view(current[name].shape)
        path = out / f"task{version}.safetensors"
        write_delta(diff_tensors(current, target, task=f"task{version}", version=version), path)
        paths.append(path)
        current = target
    return paths, current
