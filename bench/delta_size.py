"""Delta size benchmark: bytes per changed coordinate and file size of sparse deltas against
the dense LoRA factors (r = 8, PEFT file) and the full checkpoint, per density.

    .venv/bin/python -m bench.delta_size            # SmolLM2, q/v and all-linear targets
    .venv/bin/python -m bench.delta_size --quick    # q/v only

For each density, a delta with that fraction of the target weights changed at random
coordinates is written with `jlserve.delta.write_delta` (real files, header included).
Alternatives: a random PEFT LoRA adapter of rank 8 on the same targets (bf16
adapter_model.safetensors, what vLLM's runtime LoRA loads), and the merged checkpoint a
restart would load (model.safetensors). Also the break-even density where the delta file
equals the LoRA file. Writes bench/results/delta_size[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import (
    TARGETS,
    add_common_args,
    require_model,
    sparse_update,
    target_names,
    write_lora_adapter,
    write_result,
)
from jlserve.checkpoint import load_tensors, weight_files
from jlserve.delta import diff_tensors, write_delta

DENSITIES = (0.001, 0.01, 0.05, 0.20)
RANK = 8


def lora_factor_bytes(model: Path, targets: tuple[str, ...], r: int, bytes_per: int) -> int:
    """Raw bytes of r-rank A and B factors on every `targets` module (no file header)."""
    cfg = json.loads((model / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {  # (d_out, d_in)
        "q_proj": (q, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, q),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in targets)
    return per_layer * cfg["num_hidden_layers"] * bytes_per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    args = parser.parse_args()
    require_model(args.model)
    target_sets = ["qv"] if args.quick else ["qv", "linear"]

    base = load_tensors(args.model)
    checkpoint_bytes = sum(p.stat().st_size for p in weight_files(args.model))
    rows = []
    alternatives = {}
    with tempfile.TemporaryDirectory(prefix="bench-delta-size-") as tmp:
        work = Path(tmp)
        lora_dir = write_lora_adapter(args.model, work / "lora", r=RANK, seed=0)
        lora_file_qv = (lora_dir / "adapter_model.safetensors").stat().st_size
        for targets in target_sets:
            names = target_names(base, targets)
            numel = sum(base[n].numel() for n in names)
            target_bytes = sum(base[n].numel() * base[n].element_size() for n in names)
            lora_bf16 = lora_factor_bytes(args.model, TARGETS[targets], RANK, 2)
            alternatives[targets] = {
                "target_numel": numel,
                "target_weights_bytes": target_bytes,
                "lora_r8_factors_bf16_bytes": lora_bf16,
                "lora_r8_factors_fp32_bytes": 2 * lora_bf16,
                "lora_r8_peft_file_bytes": lora_file_qv if targets == "qv" else None,
                "break_even_density_vs_lora_bf16": lora_bf16 / (8 * numel),
            }
            for density in args.densities:
                child = dict(base)
                child.update(sparse_update(base, names, density, seed=1))
                delta = diff_tensors(base, child, task=f"d{density:g}", version=1)
                size = write_delta(delta, work / f"{targets}-{density:g}.safetensors")
                rows.append(
                    {
                        "targets": targets,
                        "density": density,
                        "nnz": delta.nnz,
                        "file_bytes": size,
                        "payload_bytes": delta.payload_bytes,
                        "bytes_per_changed_coordinate": size / max(delta.nnz, 1),
                        "payload_bytes_per_coordinate": delta.payload_bytes / max(delta.nnz, 1),
                        "over_lora_bf16": size / lora_bf16,
                        "over_checkpoint": size / checkpoint_bytes,
                    }
                )
                print(
                    f"{targets} {density:.1%}: {size / 1e6:.2f} MB, "
                    f"{size / max(delta.nnz, 1):.2f} B/coord, {size / lora_bf16:.2f}x LoRA r=8",
                    flush=True,
                )
    write_result(
        "delta_size",
        args.quick,
        {
            "model": str(args.model),
            "checkpoint_bytes": checkpoint_bytes,
            "rank": RANK,
            "alternatives": alternatives,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
