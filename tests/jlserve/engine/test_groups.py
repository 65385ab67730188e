"""Fused-group expansion: a touched shard brings every shard of its vLLM module."""

from __future__ import annotations

from jlserve.engine.groups import complete_groups, fused_module_key

LLAMA_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
NAMES = [
    f"model.layers.{i}.{m}.{p}"
    for i in (0, 1)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    for p in ("weight",)
] + ["model.layers.0.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight"]


def test_key_of_a_fused_shard_is_the_fused_module():
    assert fused_module_key("model.layers.3.self_attn.k_proj.weight", LLAMA_FUSED) == (
        "model.layers.3.self_attn.qkv_proj"
    )
    assert fused_module_key("model.norm.weight", LLAMA_FUSED) == "model.norm"


def test_q_brings_k_v_and_the_bias_of_the_same_layer_only():
    group = complete_groups(["model.layers.0.self_attn.q_proj.weight"], NAMES, LLAMA_FUSED)
    assert group == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
    }


def test_up_brings_gate_and_unfused_tensors_stay_alone():
    touched = [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ]
    assert complete_groups(touched, NAMES, LLAMA_FUSED) == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    }


def test_without_fused_modules_nothing_is_added():
    assert complete_groups(["model.layers.0.self_attn.q_proj.weight"], NAMES, {}) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
    }
