"""InfLoRA's subspace math on hand-made covariances and inputs."""

import math

import torch
from torch import nn

from trainer.subspace import down_projection, extend_basis, input_covariances


def _diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def test_extend_basis_takes_the_fewest_directions_reaching_the_energy_threshold() -> None:
    cov = _diag(4.0, 1.0, 0.0, 0.0)  # squared singular values 16 and 1: shares 16/17, 1/17
    assert extend_basis(None, cov, 0.9).shape == (4, 1)
    both = extend_basis(None, cov, 0.95)
    assert both.shape == (4, 2)  # a zero-energy direction is never taken, even at 1.0
    assert extend_basis(None, cov, 1.0).shape == (4, 2)
    torch.testing.assert_close(both @ both.T, _diag(1.0, 1.0, 0.0, 0.0))
    # A later task whose inputs the memory already covers adds nothing; new energy is added.
    assert extend_basis(both, _diag(2.0, 3.0, 0.0, 0.0), 0.95).shape == (4, 2)
    grown = extend_basis(both, _diag(1.0, 0.0, 3.0, 0.0), 0.95)
    assert grown.shape == (4, 3)
    torch.testing.assert_close(grown.T @ grown, torch.eye(3, dtype=torch.float64))


def test_down_projection_rows_are_orthogonal_to_the_memory_and_follow_the_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(500, 5, dtype=torch.float64) * torch.tensor([5.0, 4.0, 3.0, 0.1, 0.1])
    cov = x.T @ x / 500
    memory = torch.eye(5, dtype=torch.float64)[:, :1]  # e0 belongs to earlier tasks
    a = down_projection(cov, memory, 2)  # (2, 5)
    assert a.shape == (2, 5)
    assert (a @ memory).abs().max() < 1e-12
    torch.testing.assert_close(a.norm(dim=1), torch.full((2,), 1 / math.sqrt(3), dtype=a.dtype))
    # The two strongest remaining input directions are e1 and e2.
    assert (a[:, 1:3].norm(dim=1) * math.sqrt(3) > 0.99).all()
    # Fewer free directions than the rank: the rows stay orthogonal (some are zero).
    full = torch.eye(5, dtype=torch.float64)[:, :4]
    assert (down_projection(cov, full, 2) @ full).abs().max() < 1e-12


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.proj(x)


def test_input_covariances_leave_out_padding_tokens() -> None:
    model = _Masked()
    x = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [99.0, 99.0, 99.0]]])  # (1, 3, 3)
    mask = torch.tensor([[1, 1, 0]])
    cov = input_covariances(model, ["proj"], lambda: model(x, attention_mask=mask))["proj"]
    torch.testing.assert_close(cov, _diag(0.5, 2.0, 0.0))  # mean of the two real tokens
