"""The JumpLoRA gate: J(z) = z * 1[|z| > theta], with a straight-through estimator for theta.

J is JumpReLU applied to both signs, J(z) = JumpReLU_theta(z) - JumpReLU_theta(-z), with
JumpReLU_theta(z) = z * H(z - theta). H has zero gradient almost everywhere, so theta
learns through the JumpReLU-SAE estimator (docs/method.md, "Gradients"):

    dL/dz     = 1[|z| > theta] * g                              (no STE on z)
    dL/dtheta = -(theta / eps) * sum(K((|z| - theta) / eps) * sign(z) * g)
    K(u)      = 1[-0.5 < u < 0.5]                               (rectangle kernel)

This is the exact derivative of the gate with H smoothed by the rectangle kernel. The
reference divides it by the number of entries (a mean; `mean=True`, its preset); we keep
the sum, so the task loss and the L0 term below pull on theta in the same unit (nats)
whatever the model size (docs/trainer.md, "The learned threshold"). `eps` is an absolute
bandwidth here; the adapter passes eps = bandwidth * theta, so the kernel window is
relative to theta (the reference preset passes its absolute 1e-3).

`signed_jump` is the blended update of the schedule, f * J(z) + (1 - f) * z, as ONE
autograd node: z times a per-entry coefficient (1 where kept, 1 - f where dropped). It
saves only z (the mask is recomputed in backward) and creates no intermediate full-size
tensors for J, f * J and (1 - f) * z. `kept_fraction` is the L0 term of JumpReLU SAEs:
the fraction of surviving entries, whose STE gradient pushes theta up.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[-0.5 < u < 0.5], in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _coefficient(z: Tensor, theta: Tensor, f: float) -> Tensor:
    """f * 1[|z| > theta] + (1 - f), in z's dtype: 1 where kept, 1 - f where dropped."""
    keep = (z.abs() > theta).to(z.dtype)
    return keep if f == 1.0 else keep.mul_(f).add_(1.0 - f)


class _SignedJump(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: Tensor, f: float, mean: bool) -> Tensor:
        ctx.save_for_backward(z, theta, eps)  # z: (d_out, d_in); the mask is recomputed
        ctx.f = f
        ctx.mean = mean
        return z * _coefficient(z, theta, f)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        z, theta, eps = ctx.saved_tensors
        grad_z = g * _coefficient(z, theta, ctx.f) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # J = JumpReLU(z) - JumpReLU(-z) receives f * g. JumpReLU(z) sees f * g,
            # JumpReLU(-z) sees -f * g; K is even, so K((-z - theta)/eps) = K((z + theta)/eps).
            k = rectangle((z - theta) / eps) - rectangle((z + theta) / eps)
            pull = (k * g).mean() if ctx.mean else (k * g).sum()
            grad_theta = (-(theta / eps) * ctx.f * pull).reshape(theta.shape)
        return grad_z, grad_theta, None, None, None


class _KeptFraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: Tensor) -> Tensor:
        ctx.save_for_backward(z, theta, eps)
        return (z.abs() > theta).to(z.dtype).mean()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[None, Tensor | None, None]:
        z, theta, eps = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # d/dtheta H(|z| - theta) ~ -(1/eps) K((|z| - theta)/eps), as in JumpReLU SAEs.
            k = rectangle((z.abs() - theta) / eps)
            grad_theta = (-(g / eps) * k.mean()).reshape(theta.shape)
        return None, grad_theta, None


def _as_tensor(eps: float | Tensor, like: Tensor) -> Tensor:
    return eps.detach() if isinstance(eps, Tensor) else torch.tensor(eps, device=like.device)


def signed_jump(
    z: Tensor, theta: Tensor, eps: float | Tensor, f: float = 1.0, mean: bool = False
) -> Tensor:
    """f * J(z) + (1 - f) * z with J(z) = z * 1[|z| > theta] (sign kept); f = 1: J(z).

    `eps` is the STE bandwidth (absolute, like theta; a tensor is treated as a constant).
    mean=True: theta's gradient is averaged over z's entries (the reference) not summed.
    """
    return _SignedJump.apply(z, theta, _as_tensor(eps, z), f, mean)


def kept_fraction(z: Tensor, theta: Tensor, eps: float | Tensor) -> Tensor:
    """mean(1[|z| > theta]) as a scalar; gradient reaches theta only (the L0 term)."""
    return _KeptFraction.apply(z, theta, _as_tensor(eps, z))
