"""Tensors survive the trip through collective_rpc's plain values bit for bit."""

from __future__ import annotations

import pytest
import torch

from jlserve.engine.wire import from_wire, to_wire


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_exact(dtype):
    t = torch.randn(5, 7).to(dtype)
    t[0, 0] = -0.0
    back = from_wire(to_wire({"w": t.t()}))["w"]  # non-contiguous input
    assert back.dtype == dtype and back.shape == (7, 5)
    assert torch.equal(
        back.view(-1).view(torch.uint8), t.t().contiguous().view(-1).view(torch.uint8)
    )
