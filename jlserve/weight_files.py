"""Which files hold a checkpoint's weights. No torch import: the CLI checks `--model`
with it before handing over to vLLM, and pays no torch import for that."""

from __future__ import annotations

import json
from pathlib import Path

from jlserve.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding `model_dir`'s weights, in a stable order."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (not a safetensors checkpoint)"
    )
