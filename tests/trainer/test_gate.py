"""The STE of the JumpLoRA gate: hand-computed gradients, fusion, finite differences."""

import torch

from trainer.gate import jump_relu, rectangle, signed_jump, step_density


def test_rectangle_kernel_is_open_unit_window() -> None:
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6])
    assert rectangle(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_jump_relu_threshold_gradient_matches_formula_by_hand() -> None:
    eps, theta = 1e-3, torch.tensor(0.1, requires_grad=True)
    # Entries: two inside the kernel window (|z - theta| < eps/2), two outside.
    z = torch.tensor([0.1002, 0.0997, 0.5, -0.3], requires_grad=True)
    g = torch.tensor([2.0, -3.0, 5.0, 7.0])
    (jump_relu(z, theta, eps) * g).sum().backward()
    # dL/dtheta = -(theta/eps) * mean(K * g) = -(0.1/1e-3) * (2 - 3)/4 = 25
    assert torch.isclose(theta.grad, torch.tensor(25.0))
    # dL/dz = 1[z > theta] * g
    assert z.grad.tolist() == [2.0, 0.0, 5.0, 0.0]


def test_signed_jump_keeps_sign_and_equals_two_jump_relus() -> None:
    torch.manual_seed(0)
    z = (torch.randn(16, 24) * 0.02).requires_grad_()
    phi = torch.tensor(-4.0, requires_grad=True)
    g = torch.randn(16, 24)
    out = signed_jump(z, phi.exp(), 5e-3)
    assert torch.equal(out, z * (z.abs() > phi.exp()))
    (out * g).sum().backward()
    fused = (z.grad.clone(), phi.grad.clone())
    z.grad, phi.grad = None, None
    theta = phi.exp()
    ref = jump_relu(z, theta, 5e-3) - jump_relu(-z, theta, 5e-3)
    (ref * g).sum().backward()
    assert torch.allclose(fused[0], z.grad)
    assert torch.allclose(fused[1], phi.grad)
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
        # The reference STE reduces with a mean over entries: compare signs (and scale).
        ste = theta.grad * z.numel()
        assert torch.sign(ste) == torch.sign(fd)
        agree += int(torch.isclose(ste, fd, rtol=0.5))
    assert agree >= 15


def test_step_density_pushes_theta_up_and_leaves_z_alone() -> None:
    z = torch.tensor([0.0100, 0.0101, -0.0102, 0.5], requires_grad=True)
    theta = torch.tensor(0.01, requires_grad=True)
    d = step_density(z, theta, 1e-3)
    assert d.item() == 0.75
    d.backward()
    assert z.grad is None or torch.all(z.grad == 0)
    assert theta.grad < 0  # gradient descent raises theta, lowering the density
