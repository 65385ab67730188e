"""The golden delta files: one tiny, fully deterministic delta, written in format v1 and v2.

`golden/delta-v1.safetensors` and `golden/delta-v2.safetensors` are committed, and
`test_golden.py` pins their sha256, metadata and values. A change to their bytes is a
change of the file format (docs/delta-format.md, "Golden files"): regenerate them only
deliberately, with

    python -m tests.jlserve.delta.make_golden

and update the pins in `test_golden.py` in the same change.

The models are defined by their raw little-endian bit patterns (plain integers, no
random numbers and no float arithmetic), so the inputs are the same on every machine.
The writer's only non-deterministic field is `created_at` (the wall clock at diff time);
it is pinned to `CREATED_AT` here. `producer` is the constant "jlserve" (no version
string). Both sections of the v2 file stay uncompressed (zstd would not make sections
this small smaller), so its bytes do not depend on the zstd library's version.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from jlserve.delta import SparseDelta, diff_tensors, write_delta

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
FILES = {1: GOLDEN_DIR / "delta-v1.safetensors", 2: GOLDEN_DIR / "delta-v2.safetensors"}
TASK = "golden"
VERSION = 3
EXTRA = {"method": "golden", "seed": 0}
CREATED_AT = "2025-01-01T00:00:00+00:00"

Q = "model.layers.0.self_attn.q_proj.weight"  # bf16, changes with gaps 0 and >= 128
DOWN = "model.layers.1.mlp.down_proj.weight"  # bf16, one exponent bit
K = "model.layers.0.self_attn.k_proj.weight"  # f32
NORM = "model.norm.weight"  # bf16, unchanged: in the fingerprints, not in the delta

# name -> (dtype name, shape, bit patterns of the parent)
PARENT: dict[str, tuple[str, list[int], list[int]]] = {
    Q: ("bfloat16", [16, 16], [0x3F80 + k for k in range(256)]),  # 1.0 ... 3.98
    DOWN: ("bfloat16", [3, 5], [0xBF00 + 5 * k for k in range(15)]),  # -0.5 ... -0.77
    K: ("float32", [2, 4], [0x3F800000 + (k << 16) for k in range(8)]),  # 1.0 ... 1.05
    NORM: ("bfloat16", [8], [0x3F80] * 8),  # 1.0
}
# name -> {flat index: XOR of the parent's and the child's bits}
CHANGES: dict[str, dict[int, int]] = {
    Q: {0: 0x0001, 1: 0x0040, 130: 0x8000, 255: 0x0003},  # 130: a sign flip
    DOWN: {7: 0x0100},
    K: {2: 0x00000001, 3: 0x00400000, 5: 0x80000000},
}
_FORMATS = {"bfloat16": "H", "float16": "H", "float32": "I"}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_BITS = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}


def child_bits() -> dict[str, tuple[str, list[int], list[int]]]:
    child = {}
    for name, (dtype, shape, values) in PARENT.items():
        values = list(values)
        for i, x in CHANGES.get(name, {}).items():
            values[i] ^= x
        child[name] = (dtype, shape, values)
    return child


def raw_bytes(dtype: str, values: list[int]) -> bytes:
    """The tensor's bytes as safetensors stores them: little-endian, row-major."""
    return struct.pack(f"<{len(values)}{_FORMATS[dtype]}", *values)


def as_tensors(model: dict[str, tuple[str, list[int], list[int]]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (dtype, shape, values) in model.items():
        flat = torch.frombuffer(bytearray(raw_bytes(dtype, values)), dtype=_BITS[dtype])
        tensors[name] = flat.view(_TORCH[dtype]).reshape(shape)
    return tensors


def golden_delta() -> SparseDelta:
    """The delta from the parent to the child, as the writer makes it, `created_at` pinned."""
    delta = diff_tensors(
        as_tensors(PARENT), as_tensors(child_bits()), task=TASK, version=VERSION, extra=EXTRA
    )
    metadata = delta.metadata.model_copy(update={"created_at": CREATED_AT})
    return SparseDelta(metadata=metadata, changes=delta.changes)


def main() -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    delta = golden_delta()
    for format_version, path in FILES.items():
        size = write_delta(delta, path, format_version=format_version)
        print(f"{path}: {size} bytes")


if __name__ == "__main__":
    main()
