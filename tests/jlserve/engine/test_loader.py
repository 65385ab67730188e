"""The loader's patching: the base tensors vLLM streams, with the recorded chain applied,
are the merged model's, bit for bit (the vLLM side is exercised by the restart tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from jlserve.checkpoint import load_tensors
from jlserve.engine.loader import patched, recorded_chain
from jlserve.store import ChainEntry, StateFile


def test_streamed_base_tensors_become_the_recorded_model(delta_chain, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "deltas").mkdir(parents=True)
    entries = []
    for version, path in enumerate(delta_chain.deltas, start=1):
        (state / "deltas" / path.name).write_bytes(path.read_bytes())
        entries.append(
            ChainEntry(
                version=version,
                task=path.stem,
                fingerprint=f"sha256:{version:064d}",
                file=f"deltas/{path.name}",
                nnz=1,
                applied_at="now",
            )
        )
    base_fp = f"sha256:{0:064d}"
    (state / "state.json").write_text(
        StateFile(
            base={"path": str(delta_chain.base), "fingerprint": base_fp}, chain=entries
        ).model_dump_json()
    )
    deltas, fingerprint = recorded_chain(state)
    assert len(deltas) == 3 and fingerprint == entries[-1].fingerprint
    base, merged = load_tensors(delta_chain.base), load_tensors(delta_chain.merged[-1])
    for name, tensor in base.items():
        streamed = patched(name, tensor, deltas)
        assert torch.equal(
            streamed.view(-1).view(torch.uint8), merged[name].view(-1).view(torch.uint8)
        )


def test_no_state_means_the_plain_base(tmp_path: Path) -> None:
    assert recorded_chain(tmp_path / "none") == ([], None)
