"""Shared fixtures: real checkpoints built offline (a tiny random Llama, SmolLM2-135M)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jlserve.models.tiny import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
# The team's copy beside the checkout when there is one; else what `jlserve data
# cl-benchmark` writes into the checkout (docs/data.md), which the trainer tests need.
_SHARED_BENCHMARK = SHARED_DIR / "data" / "cl_benchmark"
CL_BENCHMARK_DIR = (
    _SHARED_BENCHMARK if _SHARED_BENCHMARK.is_dir() else REPO_ROOT / "data" / "cl_benchmark"
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (bf16, head_dim 32) with tokenizer; built once per session."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model. `make test` prepares it under models/smollm2 and exports
    JLSERVE_SMOLLM2_DIR; without it the fixture prepares a private copy (30 s)."""
    prepared = os.environ.get("JLSERVE_SMOLLM2_DIR")
    if prepared and (Path(prepared) / "model.safetensors").is_file():
        return Path(prepared)
    from jlserve.models.smollm2 import prepare_smollm2

    return prepare_smollm2(tmp_path_factory.mktemp("smollm2") / "model")
