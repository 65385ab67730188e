"""bench/inflora_memory.py: the coverage of a memory, on hand-made covariances."""

from __future__ import annotations

import pytest
import torch

from bench.inflora_memory import coverage


def test_coverage_is_the_energy_share_inside_the_span() -> None:
    """Energies 9, 3, 1 on the axes: a memory holding the second axis covers 3 of 13, while
    the inputs' own top direction (as many as the memory holds) carries 9 of 13."""
    cov = torch.diag(torch.tensor([9.0, 3.0, 1.0]))
    second_axis = torch.tensor([[0.0], [1.0], [0.0]])
    assert coverage(cov, second_axis) == pytest.approx((3 / 13, 9 / 13))


def test_coverage_of_the_top_eigen_directions_equals_their_share() -> None:
    """A memory spanning the covariance's top-2 eigen directions covers exactly their share,
    whatever rotation the inputs come in; the whole space covers everything."""
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    cov = (
        rotation
        @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
        @ rotation.T
    )
    in_memory, own = coverage(cov, rotation[:, :2])
    assert in_memory == pytest.approx(12 / 16) and own == pytest.approx(12 / 16)
    assert coverage(cov, rotation) == pytest.approx((1.0, 1.0))
