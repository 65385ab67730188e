"""Tensors survive the trip through collective_rpc's plain values bit for bit."""

from __future__ import annotations

import pytest
import torch

from jlserve.engine.protocol import TensorPatch
from jlserve.engine.wire import from_wire, patches_from_wire, patches_to_wire, to_wire


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_exact(dtype):
    t = torch.randn(5, 7).to(dtype)
    t[0, 0] = -0.0
    back = from_wire(to_wire({"w": t.t()}))["w"]  # non-contiguous input
    assert back.dtype == dtype and back.shape == (7, 5)
    assert torch.equal(
        back.view(-1).view(torch.uint8), t.t().contiguous().view(-1).view(torch.uint8)
    )


def test_patches_carry_only_positions_and_values_exactly():
    values = torch.randn(4).to(torch.bfloat16)
    patch = TensorPatch(shape=(8, 16), index=torch.tensor([0, 5, 17, 127]), values=values)
    back = patches_from_wire(patches_to_wire({"w": patch}))["w"]
    assert back.shape == (8, 16) and back.index.dtype == torch.int64
    assert torch.equal(back.index, patch.index)
    assert torch.equal(back.values.view(torch.int16), values.view(torch.int16))
