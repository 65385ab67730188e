"""Tensors and sparse patches across vLLM's `collective_rpc`, as plain msgpack values.

vLLM decodes RPC arguments by type hint, so a tensor inside an untyped dict arrives as a
`[dtype, shape, buffer]` list rather than a tensor. Sending dtype, shape and raw bytes
explicitly works the same on every vLLM version and executor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from jlserve.engine.protocol import TensorPatch

WireTensor = dict[str, str | list[int] | bytes]


def to_wire(tensors: Mapping[str, torch.Tensor]) -> dict[str, WireTensor]:
    return {
        name: {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "data": t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
        }
        for name, t in tensors.items()
    }


def from_wire(payload: Mapping[str, WireTensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, item in payload.items():
        dtype = getattr(torch, str(item["dtype"]))
        flat = torch.frombuffer(bytearray(item["data"]), dtype=dtype)  # type: ignore[arg-type]
        out[name] = flat.reshape(item["shape"])  # type: ignore[arg-type]
    return out


WirePatch = dict[str, list[int] | WireTensor]


def patches_to_wire(patches: Mapping[str, TensorPatch]) -> dict[str, WirePatch]:
    """Only the changed positions travel: (nnz,) int64 indices and (nnz,) values."""
    return {
        name: {
            "shape": list(p.shape),
            "index": to_wire({"i": p.index.to(torch.int64)})["i"],
            "values": to_wire({"v": p.values})["v"],
        }
        for name, p in patches.items()
    }


def patches_from_wire(payload: Mapping[str, WirePatch]) -> dict[str, TensorPatch]:
    out: dict[str, TensorPatch] = {}
    for name, item in payload.items():
        parts = from_wire({"i": item["index"], "v": item["values"]})  # type: ignore[dict-item]
        shape = tuple(int(d) for d in item["shape"])  # type: ignore[union-attr]
        out[name] = TensorPatch(shape=shape, index=parts["i"], values=parts["v"])
    return out
