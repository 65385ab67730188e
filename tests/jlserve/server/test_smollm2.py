"""End to end on the default model, SmolLM2-135M (tied input/output embeddings)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from jlserve.checkpoint import load_tensors, write_checkpoint
from jlserve.delta import diff_tensors, write_delta
from tests.helpers.serving import (
    ServerProcess,
    capital_of_france,
    greedy,
    outputs_only,
    start_all,
)

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


def test_the_default_model_answers_a_chat_in_its_bf16(smol):
    """`jlserve serve` on the checkpoint's own dtype answers like transformers. On CPUs with
    AMX, vLLM 0.32's AMX attention answered French prose here (jlserve.engine.cpu_attention)."""
    main, _, _ = smol
    assert "Paris" in capital_of_france(f"{main.url}/v1", main.model_name)


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


def resident_bytes_of(pid: int, path: Path) -> tuple[int, int]:
    """(resident, private) bytes of `path`'s memory maps in process `pid` (smaps)."""
    resident = private = 0
    current = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = fields[5] if len(fields) > 5 else None
        elif current == str(path) and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
        elif current == str(path) and fields[0] in ("Private_Clean:", "Private_Dirty:"):
            private += int(fields[1]) * 1024
    return resident, private


def test_the_server_keeps_the_base_mapped_not_copied(smol, smollm2_dir):
    """The API server process (the jlserve plugin's host copy) maps the checkpoint file
    and holds < 10 % of it resident after start, hashing included (the model is 257 MB)."""
    main, _, _ = smol
    weights = (smollm2_dir / "model.safetensors").resolve()
    resident, private = resident_bytes_of(main.proc.pid, weights)
    size = weights.stat().st_size
    assert resident < 0.10 * size and private < 0.10 * size, (resident, private, size)
    maps = Path(f"/proc/{main.proc.pid}/maps").read_text()
    assert str(weights) in maps  # mapped, not read into anonymous memory
