"""bench/scale.py's helpers on a small random Llama: the sharded checkpoint loads, the
delta chain applies in order and merges."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlamaForCausalLM

from bench.common import target_names
from bench.scale import param_count, shape_for, write_chain, write_random_llama
from jlserve.checkpoint import TensorDigests, load_tensors, weight_files
from jlserve.delta import plan_update, read_delta


def _random_llama(tokenizer_dir: Path, out: Path) -> tuple[Path, int]:
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    shape = shape_for(2e6, vocab)
    return write_random_llama(out, shape, tokenizer_dir, seed=0), param_count(shape)


def test_scale_checkpoint_is_sharded_and_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, expected = _random_llama(tiny_model_dir, tmp_path / "model")
    assert len(weight_files(model)) >= 4 and (model / "tokenizer.json").is_file()
    assert sum(t.numel() for t in load_tensors(model).values()) == expected
    _, info = LlamaForCausalLM.from_pretrained(model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_scale_chain_applies_in_order_and_merges(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _ = _random_llama(tiny_model_dir, tmp_path / "model")
    base = load_tensors(model)
    names = target_names(base, "qv")
    out = tmp_path / "chain"
    manifest = write_chain(model, names, [0.01, 0.05], out, seed=0, merged=True)
    state, digests = dict(base), TensorDigests(base)
    for entry, density in zip(manifest["deltas"], [0.01, 0.05], strict=True):
        assert entry["nnz"] == sum(round(density * base[n].numel()) for n in names)
        plan = plan_update(state, digests, read_delta(out / entry["file"]))
        state.update(plan.changed)
        digests = plan.digests
    assert digests.fingerprint == TensorDigests(load_tensors(out / "merged")).fingerprint
    assert write_chain(model, names, [0.01, 0.05], out, seed=0) == manifest  # cached
