"""Input subspaces for InfLoRA (Liang & Li, CVPR 2024): covariance of a layer's inputs, the
down-projection A_t designed from it, and the GPM memory of earlier tasks' subspaces.

For an adapted linear layer with inputs x (d_in) and a memory M (d_in, k) whose orthonormal
columns span the inputs of earlier tasks:

    C    = mean over the task's tokens of x x^T                (d_in, d_in)
    A_t  = top-r left singular vectors of (I - M M^T) C, as rows, / sqrt(3)
    dW_t = B_t A_t  (A_t frozen, B_t trained)   =>   dW_t M = 0

so the new task's update leaves the outputs on earlier tasks' inputs unchanged. After the
task, M gains the directions of the new task's inputs that it does not yet cover, until the
covered share of the energy reaches the threshold (GPM's criterion, as in the authors'
`update_DualGPM`; the energy of a direction is its squared singular value of C).

C is accumulated in float32 (the matmuls of the input pass) and the SVDs run in float64: the
orthogonality the method promises is only as good as M's and the final projection's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainer.errors import TrainerError


def input_covariances(
    model: nn.Module, names: list[str], feed: Callable[[], None]
) -> dict[str, Tensor]:
    """C (d_in, d_in), float64, per named submodule, over the inputs it sees while `feed` runs
    the model. Padding tokens are left out: a pre-hook on the model reads each call's
    `attention_mask` (when given as a keyword and shaped like the tokens)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    mask: list[Tensor | None] = [None]

    def read_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask[0] = kwargs.get("attention_mask")

    def accumulate(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            tokens = x.reshape(-1, x.shape[-1]).float()  # (n, d_in)
            m = mask[0]
            if m is not None and m.numel() == tokens.shape[0]:
                tokens = tokens[m.reshape(-1).bool()]
            outer = tokens.T @ tokens  # (d_in, d_in)
            sums[name] = sums[name] + outer if name in sums else outer
            counts[name] += tokens.shape[0]

        return hook

    handles = [model.register_forward_pre_hook(read_mask, with_kwargs=True)]
    handles += [model.get_submodule(n).register_forward_pre_hook(accumulate(n)) for n in names]
    try:
        feed()
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise TrainerError(f"InfLoRA: no input tokens reached {missing[:3]}")
    return {n: sums[n].double() / counts[n] for n in names}


def _remove(basis: Tensor | None, m: Tensor) -> Tensor:
    """(I - M M^T) m: the part of m's columns outside span(M)."""
    return m if basis is None else m - basis @ (basis.T @ m)


def down_projection(cov: Tensor, basis: Tensor | None, rank: int) -> Tensor:
    """A_t (rank, d_in) float64: the principal directions of the new task's inputs outside
    span(basis). Scaled by 1/sqrt(3) as the authors do (the row norm of LoRA's kaiming init).
    The rows are projected once more so they are orthogonal to the memory even where the
    projected covariance has fewer than `rank` non-zero directions."""
    d_in = cov.shape[0]
    if rank > d_in:
        raise TrainerError(f"InfLoRA: adapter.r {rank} exceeds the input width {d_in}")
    u = torch.linalg.svd(_remove(basis, cov), full_matrices=False).U[:, :rank]  # (d_in, rank)
    return _remove(basis, u).T / math.sqrt(3)


def extend_basis(basis: Tensor | None, cov: Tensor, threshold: float) -> Tensor:
    """The memory after a task: `basis` (d_in, k) plus the fewest principal directions of
    the task's inputs outside it with which the covered energy share reaches `threshold`
    (only numerically non-zero directions; at most d_in columns in all)."""
    total = torch.linalg.svdvals(cov).square().sum()
    u, s, _ = torch.linalg.svd(_remove(basis, cov), full_matrices=False)
    ratio = s.square() / total  # energy share of each new direction, decreasing
    covered = 1.0 - ratio.sum()  # share already in span(basis)
    before = covered + torch.cumsum(ratio, 0) - ratio  # covered share before adding each
    tol = s.max() * max(cov.shape) * torch.finfo(s.dtype).eps
    take = int(((before < threshold) & (s > tol)).sum())
    new = u[:, :take]  # (d_in, take)
    return new.contiguous() if basis is None else torch.cat([basis, new], dim=1)
