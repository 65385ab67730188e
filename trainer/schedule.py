"""The dense-to-sparse schedule f(step) and the order-statistic threshold re-init (ref).

f = clip((step - t1) / (t2 - t1), 0, 1) with t1 = floor(0.2 T), t2 = floor(0.8 T), T the
task's optimizer steps: dense for the first 20 %, blended, fully sparse from 80 % on. At
step t1 theta is re-initialised so that as many dW entries survive as the adapter has
parameters (`order_log_threshold`). The two fractions are the reference's; other values
(`adapter.sparse_schedule`) are an ablation of how long the adapter re-fits under the gate
(start = end = 1: trained dense, cut once before the merge, no re-fitting).

t1 is at least 1: B = 0 at init, so dW is all zero before the first optimizer step, and a
threshold re-initialised from it (or a gate switched on at step 0) would drop every entry
and stop every gradient (the reference's t1 = 0 for T < 5). A task shorter than 2 steps
never reaches t1; its threshold is initialised before the merge instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.config import SPARSE_SCHEDULE_DEFAULT

MIN_THETA = 1e-12  # theta is stored as log(max(theta, MIN_THETA))


@dataclass(frozen=True)
class SparsitySchedule:
    total_steps: int
    start: float = SPARSE_SCHEDULE_DEFAULT[0]  # t1 and t2 as fractions of total_steps (ref)
    end: float = SPARSE_SCHEDULE_DEFAULT[1]

    @property
    def t1(self) -> int:
        return max(math.floor(self.start * self.total_steps), 1)

    @property
    def t2(self) -> int:
        return math.floor(self.end * self.total_steps)

    def f(self, step: int) -> float:
        """Weight of the gated update at optimizer step `step` (0-based)."""
        if self.t2 <= self.t1:  # too few steps to blend: a hard switch at t1
            return 1.0 if step >= self.t1 else 0.0
        return min(max((step - self.t1) / (self.t2 - self.t1), 0.0), 1.0)


def order_log_threshold(values: Tensor, keep: int) -> Tensor:
    """phi = log(theta) (float32 scalar) with exactly `keep` entries of `values` above theta.

    `values` are |dW| entries (>= 0). theta is the midpoint between the largest dropped and
    the smallest kept value, so the count is exact. When those two are tied no threshold can
    split them: theta is then the tied value and every tied entry is dropped, so the count
    falls below `keep`, never above it. phi is float32, so exp(phi) moves in relative steps
    of ~5e-7: phi is nudged to land between the two values; when they are closer than
    that step they are treated as a tie (dropped).
    """
    values = values.detach().reshape(-1).float()
    n = values.numel()
    if keep >= n:
        return torch.tensor(math.log(MIN_THETA))
    if keep <= 0:
        return torch.tensor(math.log(max(float(values.max()), MIN_THETA)))
    # One selection pass (topk of the keep + 1 largest) instead of two kthvalue calls.
    top = torch.topk(values, keep + 1, sorted=False).values  # (keep + 1,)
    lo, hi = torch.topk(top, 2, largest=False).values.tolist()  # largest dropped, smallest kept
    theta = lo if hi <= lo else lo + (hi - lo) / 2
    phi = torch.tensor(math.log(max(theta, MIN_THETA)), dtype=torch.float32)
    down, up = torch.tensor(-math.inf), torch.tensor(math.inf)
    for _ in range(16):  # a few ulps at most
        if hi > lo and float(phi.exp()) >= hi:
            phi = torch.nextafter(phi, down)
        else:
            break
    while float(phi.exp()) < lo:  # never keep the largest dropped value
        phi = torch.nextafter(phi, up)
    return phi
