"""End to end on the default model, SmolLM2-135M (tied input/output embeddings)."""

from __future__ import annotations

import httpx
import pytest
import torch

from jlserve.checkpoint import load_tensors, write_checkpoint
from jlserve.delta import diff_tensors, write_delta
from tests.helpers.serving import ServerProcess, greedy, outputs_only, start_all

pytestmark = pytest.mark.slow

# Tied embeddings: a change to embed_tokens must reach the output projection too.
TOUCHED = (
    "model.embed_tokens.weight",
    "model.layers.3.self_attn.k_proj.weight",
    "model.layers.7.mlp.gate_proj.weight",
    "model.layers.12.post_attention_layernorm.weight",
)
PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):")


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    base = load_tensors(smollm2_dir)
    gen = torch.Generator().manual_seed(3)
    target = dict(base)
    for name in TOUCHED:
        flat = base[name].reshape(-1).clone()
        idx = torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 50]
        flat[idx] += (0.05 * torch.randn(idx.numel(), generator=gen)).to(flat.dtype)
        target[name] = flat.view(base[name].shape)
    delta = root / "task1.safetensors"
    write_delta(diff_tensors(base, target, task="task1", version=1), delta)
    write_checkpoint(target, root / "merged", like=smollm2_dir)
    main = ServerProcess(smollm2_dir, root / "state", root / "main.log", ("--insecure-admin",))
    fresh = ServerProcess(
        root / "merged", root / "ref-state", root / "ref.log", ("--insecure-admin",)
    )
    start_all([main, fresh])
    yield main, fresh, delta
    main.stop()
    fresh.stop()


def test_smollm2_update_and_rollback_are_exact(smol):
    main, fresh, delta = smol
    base_outputs = greedy(main, PROMPTS)
    r = httpx.post(f"{main.url}/admin/deltas", content=delta.read_bytes(), timeout=300)
    assert r.status_code == 200, r.text
    updated = greedy(main, PROMPTS)
    assert outputs_only(updated) == outputs_only(greedy(fresh, PROMPTS))
    assert outputs_only(updated) != outputs_only(base_outputs)
    r = httpx.post(f"{main.url}/admin/rollback", json={"to_version": 0}, timeout=300)
    assert r.status_code == 200, r.text
    assert greedy(main, PROMPTS) == base_outputs
