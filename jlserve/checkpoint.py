"""HF safetensors checkpoints on disk: load, fingerprint, and write atomically.

A checkpoint is a directory with `config.json`, tokenizer files and either one
`model.safetensors` or shards listed in `model.safetensors.index.json`. jlserve only
ever rewrites the weight files; every other file is copied byte for byte.

The fingerprint identifies a checkpoint's weights exactly (names, dtypes, shapes and
raw bytes). It is computed per tensor and then combined, so after a sparse update
only the touched tensors need re-hashing (see `TensorDigests`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from jlserve.errors import CheckpointError
from jlserve.fsutil import atomic_write_bytes as atomic_write_bytes  # re-exported
from jlserve.weight_files import INDEX_FILE as INDEX_FILE  # re-exported
from jlserve.weight_files import SINGLE_FILE as SINGLE_FILE  # re-exported
from jlserve.weight_files import weight_files

FINGERPRINT_PREFIX = "sha256:"


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All weight tensors of a checkpoint, by HF parameter name, on CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
    return tensors


def load_file_layout(model_dir: Path) -> dict[str, list[str]]:
    """Which tensor names each weight file holds, so a rewrite keeps the same sharding."""
    layout: dict[str, list[str]] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            layout[path.name] = list(f.keys())
    return layout


# ----------------------------------------------------------------------------- fingerprint


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """sha256 over a tensor's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    h.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
    flat = tensor.detach().contiguous().view(-1)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.digest()


def digest_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, bytes]:
    """`tensor_digest` of each named tensor, on every core: hashlib releases the GIL, and a
    large model's first start is bound by hashing (~0.6 GB/s per core here)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1) or 1) as pool:
        return dict(
            zip(names, pool.map(lambda n: tensor_digest(n, tensors[n]), names), strict=True)
        )


class TensorDigests:
    """Per-tensor digests of a state dict; the fingerprint is their combination.

    Keeping the per-tensor digests lets a server re-hash only the tensors a delta
    touched (milliseconds) instead of the whole model (seconds).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._digests = digest_tensors(tensors, list(tensors))

    @classmethod
    def from_digests(cls, digests: Mapping[str, bytes]) -> TensorDigests:
        """Digests computed earlier (e.g. read from the state dir's digest cache)."""
        new = cls({})
        new._digests = dict(digests)
        return new

    def updated(self, changed: Mapping[str, torch.Tensor]) -> TensorDigests:
        """A copy with the digests of `changed` recomputed (self is left as it was)."""
        return TensorDigests.from_digests({**self._digests, **digest_tensors(changed, changed)})

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._digests):
            h.update(self._digests[name])
        return FINGERPRINT_PREFIX + h.hexdigest()


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The exact identity of a set of weights: `sha256:<64 hex digits>`."""
    return TensorDigests(tensors).fingerprint


def fingerprint_dir(model_dir: Path) -> str:
    return fingerprint(load_tensors(model_dir))


# ----------------------------------------------------------------------------- writing


def prepare_output_dir(out_dir: Path) -> None:
    """Refuse to overwrite: an existing non-empty output directory is a user error."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: output path exists and is not empty; choose a new one")


def write_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    out_dir: Path,
    *,
    like: Path | None = None,
    extra_files: Iterable[tuple[str, bytes]] = (),
) -> None:
    """Write a checkpoint directory atomically.

    The directory is assembled under a temporary name beside `out_dir` and renamed
    into place at the end, so a crash never leaves a half-written checkpoint.
    With `like`, every non-weight file is copied from that checkpoint and the weights
    keep its sharding; otherwise one `model.safetensors` is written.
    """
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        if like is not None:
            layout = load_file_layout(like)
            weight_names = {p.name for p in weight_files(like)}
            for src in Path(like).iterdir():
                if src.is_file() and src.name not in weight_names:
                    shutil.copy2(src, staging / src.name)
        else:
            layout = {SINGLE_FILE: list(tensors)}
        missing = set(tensors) - {n for names in layout.values() for n in names}
        if missing:
            raise CheckpointError(f"tensors not in the reference layout: {sorted(missing)[:5]}")
        for file_name, names in layout.items():
            shard = {n: tensors[n].contiguous() for n in names}
            save_file(shard, str(staging / file_name), metadata={"format": "pt"})
        for name, data in extra_files:
            (staging / name).write_bytes(data)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
