"""bench/common.py's helpers on the tiny model: percentile, the sparse update, the LoRA
adapter writer and the machine lines of a result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.common import (
    machine_line,
    percentile,
    rows_machine_lines,
    sparse_update,
    target_names,
    write_lora_adapter,
)
from jlserve.checkpoint import load_tensors


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_sparse_update_changes_exactly_the_requested_fraction(tiny_model_dir: Path) -> None:
    base = load_tensors(tiny_model_dir)
    names = target_names(base, "qv")
    assert names and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in names)
    new = sparse_update(base, names, 0.05, seed=0)
    for n in names:
        changed = int((new[n].view(torch.int16) != base[n].view(torch.int16)).sum())
        assert changed == round(0.05 * base[n].numel())
        assert torch.isfinite(new[n]).all()


def test_lora_adapter_loads_in_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    adapter = write_lora_adapter(tiny_model_dir, tmp_path / "lora", r=8, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = peft.PeftModel.from_pretrained(model, adapter)
    loaded = [n for n, _ in wrapped.named_parameters() if "lora_B" in n]
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert len(loaded) == 2 * cfg["num_hidden_layers"]


def test_machine_line_names_the_gpu_only_where_there_is_one() -> None:
    cpu = {"cpu_model": "Xeon", "cpu_count": 2, "torch": "2.13.0", "transformers": "5.19.0"}
    assert "CUDA" not in machine_line(cpu)
    line = machine_line({**cpu, "gpu": "NVIDIA H200", "cuda": "13.0"})
    assert "Xeon, 2 cores | NVIDIA H200 (CUDA 13.0) | torch 2.13.0" in line


def test_a_result_file_names_the_machine_of_each_row_not_of_its_render() -> None:
    amd = {"cpu_model": "AMD EPYC", "cpu_count": 2, "torch": "2.13.0"}
    xeon = {**amd, "cpu_model": "Xeon"}
    same = [{"variant": "incLoRA", "machine": amd}, {"variant": "seqLoRA", "machine": amd}]
    assert rows_machine_lines(same, xeon) == ["Machine: " + machine_line(amd)]
    mixed = rows_machine_lines([*same, {"variant": "incLoRA+jump"}], xeon)  # row has none
    assert len(mixed) == 2
    assert mixed[0].startswith("Machine: AMD EPYC") and mixed[0].endswith("(incLoRA, seqLoRA)")
    assert mixed[1].startswith("Machine: Xeon") and mixed[1].endswith("(incLoRA+jump)")
