"""The JumpLoRA gate: J(z) = z * 1[|z| > theta], with a straight-through estimator for theta.

J is JumpReLU applied to both signs, J(z) = JumpReLU_theta(z) - JumpReLU_theta(-z), with
JumpReLU_theta(z) = z * H(z - theta). H has zero gradient almost everywhere, so theta
learns through the JumpReLU-SAE estimator (method doc, "Gradients"):

    dL/dz     = 1[|z| > theta] * g                               (no STE on z)
    dL/dtheta = -(theta / eps) * mean(K((z - theta) / eps) * g)  per JumpReLU call
    K(u)      = 1[-0.5 < u < 0.5]                                 (rectangle kernel)

`signed_jump` fuses the two JumpReLU calls into one autograd node (one saved tensor,
no intermediate copies); `jump_relu` is the single-sided primitive it is defined by, kept
public because the tests check the fusion against it. `step_density` is the L0 term of
JumpReLU SAEs: the fraction of surviving entries, whose STE gradient pushes theta up.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_EPS = 1e-3  # kernel bandwidth (ref)


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[-0.5 < u < 0.5], in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        z, theta = ctx.saved_tensors
        grad_z = g * (z > theta) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            k = rectangle((z - theta) / ctx.eps)
            grad_theta = (-(theta / ctx.eps) * (k * g).mean()).reshape(theta.shape)
        return grad_z, grad_theta, None


class _SignedJump(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)  # z: (d_out, d_in); the mask is recomputed
        ctx.eps = eps
        return z * (z.abs() > theta)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        z, theta = ctx.saved_tensors
        grad_z = g * (z.abs() > theta) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # JumpReLU(z) sees upstream g; JumpReLU(-z) sees -g (J subtracts it).
            # K is even, so K((-z - theta)/eps) = K((z + theta)/eps).
            k_pos = rectangle((z - theta) / ctx.eps)
            k_neg = rectangle((z + theta) / ctx.eps)
            grad_theta = (-(theta / ctx.eps) * ((k_pos - k_neg) * g).mean()).reshape(theta.shape)
        return grad_z, grad_theta, None


class _StepDensity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z.abs() > theta).to(z.dtype).mean()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[None, Tensor | None, None]:
        z, theta = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # d/dtheta H(|z| - theta) ~ -(1/eps) K((|z| - theta)/eps), as in JumpReLU SAEs.
            k = rectangle((z.abs() - theta) / ctx.eps)
            grad_theta = (-(g / ctx.eps) * k.mean()).reshape(theta.shape)
        return None, grad_theta, None


def jump_relu(z: Tensor, theta: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """JumpReLU_theta(z) = z * H(z - theta) with the rectangle-kernel STE for theta."""
    return _JumpReLU.apply(z, theta, eps)


def signed_jump(z: Tensor, theta: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """J(z) = JumpReLU_theta(z) - JumpReLU_theta(-z): keeps entries with |z| > theta, sign kept."""
    return _SignedJump.apply(z, theta, eps)


def step_density(z: Tensor, theta: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """mean(1[|z| > theta]) as a scalar; gradient reaches theta only (the L0 term)."""
    return _StepDensity.apply(z, theta, eps)
