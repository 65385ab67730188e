"""Which HF tensors must travel together when weights are reloaded through vLLM.

vLLM fuses HF modules (q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj) and, on
the reload path, re-processes a fused module only once all of its shards arrived; a
partial group returns OK but leaves the missing shards as garbage. So a change to
`q_proj.weight` must ship `q_proj`, `k_proj` and `v_proj` weights (and biases, if the
model has them). Pure functions on names: no vLLM import, unit-testable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def fused_module_key(name: str, fused_modules: Mapping[str, Iterable[str]]) -> str:
    """The vLLM module an HF tensor is loaded into: `...self_attn.q_proj.weight` ->
    `...self_attn.qkv_proj`; unfused tensors map to their own module path."""
    module, _, _param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    for fused, members in fused_modules.items():
        if leaf in members:
            return f"{parent}.{fused}" if parent else fused
    return module


def complete_groups(
    touched: Iterable[str],
    all_names: Iterable[str],
    fused_modules: Mapping[str, Iterable[str]],
) -> set[str]:
    """`touched` plus every tensor sharing a (fused) module with one of them."""
    keys = {fused_module_key(n, fused_modules) for n in touched}
    return {n for n in all_names if fused_module_key(n, fused_modules) in keys}
