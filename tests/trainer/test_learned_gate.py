"""The learned threshold on problems whose best update is sparse: theta moves by its own
gradient, the kept support approaches the true one, and the density differs by task."""

from __future__ import annotations

import torch
from torch import nn

from trainer.adapter import Adapter
from trainer.config import AdapterConfig
from trainer.schedule import SparsitySchedule
from trainer.step import adapter_optimizer, train_step

D = 64  # a 64 x 64 weight: 4096 entries


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].q_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0].q_proj(x)


def _fit(rows: int, cols: int, steps: int = 240, seed: int = 0) -> dict:
    """Regress onto W0 + dW*, dW* a dense (rows x cols) block of rank <= 4 (sparse AND low
    rank), with the loop's training step and the default adapter config (r = 4)."""
    torch.manual_seed(seed)
    model = OneLayer()
    w0 = model.layers[0].q_proj.weight.detach().clone()
    true = torch.zeros(D, D)
    u, v = torch.randn(rows, min(rows, cols, 4)), torch.randn(min(rows, cols, 4), cols)
    true[:rows, :cols] = (u @ v) / 2  # entries of order 1, far above the noise of B @ A
    x = torch.randn(512, D)
    y = x @ (w0 + true).T + 0.3 * torch.randn(512, D)  # noise: B @ A fits some of it everywhere
    cfg = AdapterConfig(targets=["q_proj"], r=4, alpha=4)  # s = 1: dW is the update itself
    adapter = Adapter(model, cfg)
    optimizer = adapter_optimizer(adapter, 1e-2, cfg)
    schedule = SparsitySchedule(steps)
    phi_at_reinit = None
    grads: list[float] = []
    for step in range(steps):
        batch = torch.randint(0, 512, (64,))

        def task_loss(batch: torch.Tensor = batch) -> torch.Tensor:
            return (model(x[batch]) - y[batch]).square().sum(-1).mean()  # nats-like scale

        f = schedule.f(step)
        train_step(adapter, optimizer, task_loss, f, reinit=step == schedule.t1)
        if step == schedule.t1:
            phi_at_reinit = float(adapter.thresholds.phi.detach())
        if f > 0.0:
            grads.append(float(adapter.thresholds.phi.grad))
    adapter.end_training()
    m = adapter.modules["layers.0.q_proj"]
    kept = (m.delta().abs() > m.theta()).detach()
    support = true != 0
    return {
        "phi_at_reinit": phi_at_reinit,
        "phi": float(adapter.thresholds.phi.detach()),
        "grads": grads,
        "density": float(kept.float().mean()),
        "jaccard": float((kept & support).sum() / (kept | support).sum()),
        "true_density": float(support.float().mean()),
    }


def test_theta_rises_by_its_own_gradient_and_the_support_approaches_the_true_one() -> None:
    fit = _fit(rows=4, cols=8)  # 32 of 4096 entries; the re-init keeps r(d_in+d_out) = 512
    assert fit["phi"] > fit["phi_at_reinit"] + 0.5  # theta rose well above its re-init value
    # A gradient at most steps of the sparse phase; zero where theta sits in a gap between
    # noise and signal (no entry within the kernel window).
    assert sum(g != 0.0 for g in fit["grads"]) >= 0.6 * len(fit["grads"])
    assert fit["jaccard"] > 0.7
    assert fit["density"] < 2 * fit["true_density"]


def test_tasks_of_different_difficulty_end_at_different_densities() -> None:
    easy = _fit(rows=2, cols=8, seed=1)  # 16 entries
    hard = _fit(rows=8, cols=32, seed=2)  # 256 entries, rank 4
    assert easy["density"] < hard["density"] / 4
    for fit in (easy, hard):
        assert 0.5 * fit["true_density"] < fit["density"] < 2 * fit["true_density"]
