"""The worker's check that vLLM loaded every parameter it was given (pure on names)."""

from __future__ import annotations

from jlserve.engine.worker import not_loaded

LLAMA_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_fused_and_plain_parameters_count_as_loaded_under_vllm_names():
    loaded = {"model.layers.0.self_attn.qkv_proj.weight", "model.norm.weight"}
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert not_loaded([*names, "model.norm.weight"], loaded, LLAMA_FUSED) == []


def test_a_parameter_vllm_skipped_is_reported():
    loaded = {"model.layers.0.self_attn.qkv_proj.weight"}
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    assert not_loaded(names, loaded, LLAMA_FUSED) == ["model.layers.0.mlp.up_proj.weight"]


def test_a_prefixed_vllm_name_still_matches():
    loaded = {"language_model.model.layers.1.mlp.gate_up_proj.weight"}
    assert not_loaded(["model.layers.1.mlp.gate_proj.weight"], loaded, LLAMA_FUSED) == []
