"""bench/gpu_check.py without a server or a GPU: its delta chain, stand-in tasks and answer
comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.gpu_check import build_chain, compare, settings_for, write_synthetic_tasks
from jlserve.checkpoint import TensorDigests, fingerprint, load_tensors
from jlserve.delta import plan_update, read_delta
from trainer.layout import check_root


def test_gpu_check_chain_stand_in_tasks_and_comparison(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """bench/gpu_check.py without a server: its delta chain replays onto the merged
    checkpoints, its stand-in tasks pass `jlserve data check`, and the answer comparison
    tells equal from different."""
    args = argparse.Namespace(
        device="cpu", quick=True, model=tiny_model_dir, data=None, out=tmp_path / "out"
    )
    built = build_chain(settings_for(args))
    chain = built["_chain"]
    state = load_tensors(tiny_model_dir)
    digests = TensorDigests(state)
    for i, path in enumerate(chain.deltas, start=1):
        plan = plan_update(state, digests, read_delta(path))
        state, digests = {**state, **plan.changed}, plan.digests
        assert (
            fingerprint(state)
            == chain.fingerprints[i]
            == fingerprint(load_tensors(chain.merged[i]))
        )
    assert [d["density"] for d in built["deltas"]] == [0.01, 0.02, 0.05]

    assert check_root(write_synthetic_tasks(tmp_path / "data", 8, 4)) == []

    a = [{"tokens": ["token_id:5"], "logprobs": [-0.5], "top": [{"token_id:5": -0.5}]}]
    b = [{"tokens": ["token_id:5"], "logprobs": [-0.25], "top": [{"token_id:5": -0.25}]}]
    assert compare(a, a) == {"equal": True, "tokens_equal": True, "max_logprob_abs_diff": 0.0}
    assert compare(a, b) == {"equal": False, "tokens_equal": True, "max_logprob_abs_diff": 0.25}
