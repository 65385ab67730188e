"""The JumpLoRA gate: J(z) = z * 1[|z| > theta], with a straight-through estimator for theta.

J is JumpReLU applied to both signs, J(z) = JumpReLU_theta(z) - JumpReLU_theta(-z), with
JumpReLU_theta(z) = z * H(z - theta). H has zero gradient almost everywhere, so theta
learns through the JumpReLU-SAE estimator (method doc, "Gradients"):

    dL/dz     = 1[z > theta] * g                                  (no STE on z)
    dL/dtheta = -(theta / eps) * mean(K((z - theta) / eps) * g)  per JumpReLU call
    K(u)      = 1[-0.5 < u < 0.5]                                 (rectangle kernel)

`signed_jump` is the blended update of the schedule, f * J(z) + (1 - f) * z, as ONE
autograd node: z times a per-entry coefficient (1 where kept, 1 - f where dropped). It
saves only z (the mask is recomputed in backward) and creates no intermediate full-size
tensors for J, f * J and (1 - f) * z. `step_density` is the L0 term of JumpReLU SAEs: the
fraction of surviving entries, whose STE gradient pushes theta up.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_EPS = 1e-3  # kernel bandwidth (ref)


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[-0.5 < u < 0.5], in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _coefficient(z: Tensor, theta: Tensor, f: float) -> Tensor:
    """f * 1[|z| > theta] + (1 - f), in z's dtype: 1 where kept, 1 - f where dropped."""
    keep = (z.abs() > theta).to(z.dtype)
    return keep if f == 1.0 else keep.mul_(f).add_(1.0 - f)


class _SignedJump(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float, f: float) -> Tensor:
        ctx.save_for_backward(z, theta)  # z: (d_out, d_in); the mask is recomputed
        ctx.eps, ctx.f = eps, f
        return z * _coefficient(z, theta, f)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        z, theta = ctx.saved_tensors
        grad_z = g * _coefficient(z, theta, ctx.f) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # J = JumpReLU(z) - JumpReLU(-z) receives f * g. JumpReLU(z) sees f * g,
            # JumpReLU(-z) sees -f * g; K is even, so K((-z - theta)/eps) = K((z + theta)/eps).
            k = rectangle((z - theta) / ctx.eps) - rectangle((z + theta) / ctx.eps)
            grad_theta = (-(theta / ctx.eps) * ctx.f * (k * g).mean()).reshape(theta.shape)
        return grad_z, grad_theta, None, None


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


def signed_jump(z: Tensor, theta: Tensor, eps: float = DEFAULT_EPS, f: float = 1.0) -> Tensor:
    """f * J(z) + (1 - f) * z with J(z) = z * 1[|z| > theta] (sign kept); f = 1: J(z)."""
    return _SignedJump.apply(z, theta, eps, f)


def step_density(z: Tensor, theta: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """mean(1[|z| > theta]) as a scalar; gradient reaches theta only (the L0 term)."""
    return _StepDensity.apply(z, theta, eps)
