"""Delta size benchmark: bytes per changed coordinate of the delta formats (v1; v2 without
and with zstd) next to the dense LoRA factors (r = 8, PEFT file) and the full checkpoint.

    .venv/bin/python -m bench.delta_size            # SmolLM2, q/v and all-linear targets
    .venv/bin/python -m bench.delta_size --quick    # q/v only, one trainer-like seed

Two kinds of update, each written as real files with `jlserve.delta.write_delta` (header
included) in format v1, v2 (no compression) and v2 + zstd:
- trainer-like (the target rows): SmolLM2 q/v merged as the JumpLoRA trainer merges a task
  (`bench.common.trainer_like_update`, about 3.5 % of the entries), several seeds; with the
  size the v2 position stream would have with the other gap encodings considered
  (uint8 / uint16 gaps with an escape), which is how the varint was chosen;
- random (`bench.common.sparse_update`): a fraction of the target weights changed at random
  coordinates by flipping low mantissa bits, per density, for the break-even against LoRA.
Writes bench/results/delta_size[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FORMATS,
    TARGETS,
    add_common_args,
    median,
    require_model,
    sparse_update,
    target_names,
    trainer_like_update,
    write_lora_adapter,
    write_result,
)
from jlserve.checkpoint import load_tensors, weight_files
from jlserve.delta import SparseDelta, diff_tensors, parse_delta, write_delta
from jlserve.delta.codec import gaps_of

DENSITIES = (0.001, 0.01, 0.05, 0.20)
RANK = 8
TARGET_BYTES_PER_COORD = {"v2": 4.0, "v2+zstd": 3.3}  # whole file, the targets


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


def format_sizes(delta: SparseDelta, work: Path, stem: str) -> dict[str, dict[str, Any]]:
    """Each format's file: bytes, bytes per changed coordinate (file / tensor data), encoding."""
    out = {}
    nnz = max(delta.nnz, 1)
    for label, (version, compression) in FORMATS.items():
        path = work / f"{stem}-{label}.safetensors"
        size = write_delta(delta, path, format_version=version, compression=compression)
        back = parse_delta(path.read_bytes())
        encoding = back.metadata.encoding
        out[label] = {
            "file_bytes": size,
            "payload_bytes": back.payload_bytes,
            "bytes_per_changed_coordinate": size / nnz,
            "payload_bytes_per_coordinate": back.payload_bytes / nnz,
            "encoding": encoding.model_dump() if encoding else None,
        }
        path.unlink()
    return out


def position_encodings(delta: SparseDelta) -> dict[str, float]:
    """Bytes per coordinate of the position stream under each gap encoding considered."""
    gaps = np.concatenate([gaps_of(c.index) for c in delta.changes.values()])
    nnz = max(gaps.size, 1)
    varint = gaps.size + sum(int((gaps >= 2 ** (7 * k)).sum()) for k in range(1, 9))
    return {
        "int32 index (v1)": 4.0,
        "uint16 gap, escape + uint32": 2 + 4 * int((gaps >= 0xFFFF).sum()) / nnz,
        "uint8 gap, escape + uint32": 1 + 4 * int((gaps >= 0xFF).sum()) / nnz,
        "varint gap (v2)": varint / nnz,
    }


def trainer_like_rows(base: dict, names: list[str], seeds: int, work: Path) -> dict[str, Any]:
    rows = []
    for seed in range(seeds):
        child = dict(base)
        child.update(trainer_like_update(base, names, seed=seed))
        delta = diff_tensors(base, child, task=f"trainer-like-{seed}", version=1)
        numel = sum(base[n].numel() for n in names)
        row = {
            "seed": seed,
            "nnz": delta.nnz,
            "density": delta.nnz / numel,
            "formats": format_sizes(delta, work, f"trainer-{seed}"),
            "position_encodings": position_encodings(delta),
        }
        rows.append(row)
        sizes = ", ".join(
            f"{k} {v['bytes_per_changed_coordinate']:.2f}" for k, v in row["formats"].items()
        )
        print(f"trainer-like q/v seed {seed}: {row['density']:.2%} dense, B/coord {sizes}")
    summary = {
        label: median([r["formats"][label]["bytes_per_changed_coordinate"] for r in rows])
        for label in FORMATS
    }
    return {
        "rows": rows,
        "median_bytes_per_changed_coordinate": summary,
        "target": {
            "max_bytes_per_changed_coordinate": TARGET_BYTES_PER_COORD,
            "met": {k: summary[k] <= v for k, v in TARGET_BYTES_PER_COORD.items()},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--seeds", type=int, default=None, help="trainer-like deltas (3; quick 1)")
    args = parser.parse_args()
    require_model(args.model)
    target_sets = ["qv"] if args.quick else ["qv", "linear"]
    seeds = args.seeds or (1 if args.quick else 3)

    base = load_tensors(args.model)
    checkpoint_bytes = sum(p.stat().st_size for p in weight_files(args.model))
    rows = []
    alternatives = {}
    with tempfile.TemporaryDirectory(prefix="bench-delta-size-") as tmp:
        work = Path(tmp)
        trainer_like = trainer_like_rows(base, target_names(base, "qv"), seeds, work)
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
                "break_even_density_vs_lora_bf16_v2": lora_bf16
                / (trainer_like["median_bytes_per_changed_coordinate"]["v2+zstd"] * numel),
            }
            for density in args.densities:
                child = dict(base)
                child.update(sparse_update(base, names, density, seed=1))
                delta = diff_tensors(base, child, task=f"d{density:g}", version=1)
                formats = format_sizes(delta, work, f"{targets}-{density:g}")
                size = formats["v2+zstd"]["file_bytes"]
                rows.append(
                    {
                        "targets": targets,
                        "density": density,
                        "nnz": delta.nnz,
                        "formats": formats,
                        "over_lora_bf16": size / lora_bf16,
                        "over_checkpoint": size / checkpoint_bytes,
                    }
                )
                print(
                    f"{targets} {density:.1%}: "
                    + ", ".join(
                        f"{k} {v['file_bytes'] / 1e6:.2f} MB "
                        f"({v['bytes_per_changed_coordinate']:.2f} B/coord)"
                        for k, v in formats.items()
                    ),
                    flush=True,
                )
    write_result(
        "delta_size",
        args.quick,
        {
            "model": str(args.model),
            "checkpoint_bytes": checkpoint_bytes,
            "rank": RANK,
            "trainer_like": trainer_like,
            "alternatives": alternatives,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
