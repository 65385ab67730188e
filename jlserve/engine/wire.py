"""Tensors across vLLM's `collective_rpc`, as plain msgpack values.

vLLM decodes RPC arguments by type hint, so a tensor inside an untyped dict arrives as a
`[dtype, shape, buffer]` list rather than a tensor. Sending dtype, shape and raw bytes
explicitly works the same on every vLLM version and executor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
