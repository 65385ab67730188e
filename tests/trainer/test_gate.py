"""The STE of the JumpLoRA gate: hand-computed gradients, fusion, finite differences."""

import pytest
import torch

from trainer.gate import kept_fraction, rectangle, signed_jump


class _JumpReLU(torch.autograd.Function):
    """JumpReLU_theta(z) = z * H(z - theta) with the STE written out plainly (summed over
    entries): the reference the fused gate is checked against."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        k = rectangle((z - theta) / ctx.eps)
        return g * (z > theta), -(theta / ctx.eps) * (k * g).sum(), None


def test_rectangle_kernel_is_open_unit_window() -> None:
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6])
    assert rectangle(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("f", [1.0, 0.25])
def test_threshold_gradient_matches_formula_by_hand(f: float, mean: bool) -> None:
    eps = 1e-3
    phi = torch.tensor(0.1).log().requires_grad_()
    theta = phi.exp()
    # In the +theta window: 0.1002, 0.0997; in the -theta window: -0.1003; outside: 0.5, -0.3.
    z = torch.tensor([0.1002, 0.0997, -0.1003, 0.5, -0.3], requires_grad=True)
    g = torch.tensor([2.0, -3.0, 4.0, 5.0, 7.0])
    out = signed_jump(z, theta, eps, f, mean=mean)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])  # |z| > theta, sign kept
    assert torch.equal(out, z.detach() * (f * keep + (1 - f)))
    (out * g).sum().backward()
    # dL/dtheta = -(theta/eps) * f * sum((K_pos - K_neg) * g)
    #           = -(0.1/1e-3) * f * (2 - 3 - 4) = 500 f;  dL/dphi = theta * dL/dtheta.
    # The reference's mean divides the sum by the 5 entries.
    expected = 0.1 * 500.0 * f / (5 if mean else 1)
    torch.testing.assert_close(phi.grad, torch.tensor(expected))
    # dL/dz = (f * 1[|z| > theta] + 1 - f) * g: no STE on z.
    torch.testing.assert_close(z.grad, (f * keep + (1 - f)) * g)


@pytest.mark.parametrize("f", [1.0, 0.6])
def test_fused_gate_equals_the_blend_of_two_jump_relus(f: float) -> None:
    torch.manual_seed(0)
    z = (torch.randn(16, 24) * 0.02).requires_grad_()
    phi = torch.tensor(-4.0, requires_grad=True)
    g = torch.randn(16, 24)
    fused = signed_jump(z, phi.exp(), 5e-3, f)
    (fused * g).sum().backward()
    got = (fused.detach(), z.grad.clone(), phi.grad.clone())
    z.grad, phi.grad = None, None
    theta = phi.exp()
    j = _JumpReLU.apply(z, theta, 5e-3) - _JumpReLU.apply(-z, theta, 5e-3)
    ref = f * j + (1 - f) * z
    (ref * g).sum().backward()
    torch.testing.assert_close(got[0], ref.detach())
    torch.testing.assert_close(got[1], z.grad)
    torch.testing.assert_close(got[2], phi.grad)
    assert phi.grad != 0  # the window holds entries, so the test checks something


def _smoothed_loss(
    z: torch.Tensor, theta: torch.Tensor, g: torch.Tensor, eps: float
) -> torch.Tensor:
    """sum(g * J_smooth(z)), with H replaced by the integral of the rectangle kernel."""
    h_pos = ((z - theta) / eps + 0.5).clamp(0, 1)
    h_neg = ((-z - theta) / eps + 0.5).clamp(0, 1)
    return (g * (z * h_pos - (-z) * h_neg)).sum()


def test_threshold_gradient_sign_agrees_with_finite_difference_of_smoothed_gate() -> None:
    torch.manual_seed(1)
    eps = 1e-3
    agree = 0
    for trial in range(20):
        theta0 = 0.01
        z = theta0 + (torch.rand(400) - 0.5) * 4 * eps  # many entries near the threshold
        z = z * torch.where(torch.rand(400) < 0.5, -1.0, 1.0)
        g = torch.randn(400) + (0.5 if trial % 2 else -0.5)
        theta = torch.tensor(theta0, requires_grad=True)
        (signed_jump(z, theta, eps) * g).sum().backward()
        h = 1e-6
        fd = (
            _smoothed_loss(z, torch.tensor(theta0 + h), g, eps)
            - _smoothed_loss(z, torch.tensor(theta0 - h), g, eps)
        ) / (2 * h)
        ste = theta.grad  # summed over entries: the derivative of the smoothed gate itself
        assert torch.sign(ste) == torch.sign(fd)
        agree += int(torch.isclose(ste, fd, rtol=0.5))
    assert agree >= 15


def test_kept_fraction_pushes_theta_up_and_leaves_z_alone() -> None:
    z = torch.tensor([0.0100, 0.0101, -0.0102, 0.5], requires_grad=True)
    theta = torch.tensor(0.01, requires_grad=True)
    d = kept_fraction(z, theta, 1e-3)
    assert d.item() == 0.75
    d.backward()
    assert z.grad is None or torch.all(z.grad == 0)
    assert theta.grad < 0  # gradient descent raises theta, lowering the density
