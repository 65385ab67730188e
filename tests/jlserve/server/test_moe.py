"""Layers vLLM transforms after loading: a tiny Mixtral on both apply paths.

vLLM re-lays out fused-MoE expert weights after loading (and its reload path left an
experts layer unloaded when given one expert), so a delta touching an expert must be
refused before anything changes, on both paths; the attention and router weights of
the same model update exactly (compared with fresh servers on the merged checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jlserve.checkpoint import load_tensors, write_checkpoint
from jlserve.delta import diff_tensors, write_delta
from tests.helpers.serving import REPACKED_ARGS, ServerProcess, greedy, outputs_only, start_all
from tests.helpers.tiny_moe import build_tiny_mixtral

pytestmark = pytest.mark.slow

EXPERT = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
ATTENTION_AND_ROUTER = (
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.block_sparse_moe.gate.weight",
)


@dataclass
class Moe:
    base: Path
    expert_delta: Path
    attention_delta: Path
    merged: Path


def _delta(base: dict, names: tuple[str, ...], path: Path) -> dict:
    target = dict(base)
    for name in names:
        flat = base[name].reshape(-1).clone()
        flat[::7] += 0.25
        target[name] = flat.view(base[name].shape)
    write_delta(diff_tensors(base, target, task=path.stem), path)
    return target


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Moe:
    root = tmp_path_factory.mktemp("moe")
    base_dir = build_tiny_mixtral(root / "base")
    base = load_tensors(base_dir)
    _delta(base, (EXPERT,), root / "experts.safetensors")
    target = _delta(base, ATTENTION_AND_ROUTER, root / "attention.safetensors")
    write_checkpoint(target, root / "merged", like=base_dir)
    return Moe(
        base_dir, root / "experts.safetensors", root / "attention.safetensors", root / "merged"
    )


# (jlserve flags, engine args) per apply path
PATHS = {
    "in_place": (("--insecure-admin", "--cpu-dense-weights"), ()),
    "reload": (("--insecure-admin",), REPACKED_ARGS),
}


@pytest.fixture(scope="module", params=list(PATHS))
def servers(moe, tmp_path_factory, request):
    """The main server (on the base) and its reference (on the merged checkpoint) for one
    apply path; two at a time, so four engines never start together on a small machine."""
    path = request.param
    flags, engine_args = PATHS[path]
    root = tmp_path_factory.mktemp(f"moe-{path}")
    made = [
        ServerProcess(model, root / f"{role}-state", root / f"{role}.log", flags, engine_args)
        for role, model in (("main", moe.base), ("ref", moe.merged))
    ]
    start_all(made)
    yield path, *made
    for server in made:
        server.stop()


def test_an_expert_delta_is_refused_and_attention_updates_exactly(servers, moe):
    path, main, reference = servers
    assert httpx.get(f"{main.url}/admin/status").json()["apply_path"] == path
    before = greedy(main)
    r = httpx.post(f"{main.url}/admin/deltas", content=moe.expert_delta.read_bytes(), timeout=120)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "unsupported_update"
    assert EXPERT in error["message"] and "nothing changed" in error["message"]
    assert httpx.get(f"{main.url}/admin/status").json()["version"] == 0
    assert greedy(main) == before
    r = httpx.post(
        f"{main.url}/admin/deltas", content=moe.attention_delta.read_bytes(), timeout=120
    )
    assert r.status_code == 200, r.text
    updated = greedy(main)
    assert outputs_only(updated) == outputs_only(greedy(reference))
    assert outputs_only(updated) != outputs_only(before)
