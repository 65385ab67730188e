"""bench/hot_swap.py through its helpers only (starting vLLM takes minutes): its delta
chain applies in order on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.common import target_names
from bench.hot_swap import build_chain, fused_bytes
from jlserve.checkpoint import TensorDigests, load_tensors
from jlserve.delta import parse_delta, plan_update


def test_hot_swap_chain_applies_in_order(tiny_model_dir: Path) -> None:
    base = load_tensors(tiny_model_dir)
    names = target_names(base, "qv")
    chain, final = build_chain(base, names, [0.01, 0.2], seed=0)
    state, digests = dict(base), TensorDigests(base)
    for item in chain:
        plan = plan_update(state, digests, parse_delta(item["bytes"]))
        state.update(plan.changed)
        digests = plan.digests
    assert all(torch.equal(state[n], final[n]) for n in names)
    assert fused_bytes(base, names) > sum(base[n].numel() * 2 for n in names)
