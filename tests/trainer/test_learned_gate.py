"""The learned threshold on problems whose best update is sparse: theta moves by its own
gradient, the kept support ends exactly on the true one, so the density differs by task
and, with per-block thresholds, by block, and equals the truth's.

Exact, not approximate: measured over seeds 0-7 of each fit below (CPU fp32), every true
entry ended at >= 3.2 theta and every other one at <= 0.95 theta, so summation-order noise
(~1e-7 relative) cannot move an entry across it; the seeds used here gave identical results
on 1 and 2 threads."""

from __future__ import annotations

import torch
from torch import nn

from trainer.adapter import Adapter
from trainer.config import AdapterConfig
from trainer.schedule import SparsitySchedule
from trainer.step import adapter_optimizer, train_step

D = 64  # a 64 x 64 weight: 4096 entries


class Blocks(nn.Module):
    """n transformer-like blocks with one adapted projection each (model.layers.<i>.q_proj),
    all reading the same input; the outputs are concatenated."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module() for _ in range(n)])
        for layer in self.layers:
            layer.q_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer.q_proj(x) for layer in self.layers], -1)


def _fit(
    blocks: list[tuple[int, int]],
    granularity: str = "global",
    steps: int = 240,
    seed: int = 0,
    threshold_training: str = "ours",
) -> list[dict]:
    """Regress each block onto W0 + dW*, dW* a dense (rows x cols) corner of rank 1 with
    entries of magnitude 0.5-1 (sparse AND low rank), with the loop's training step and the
    default adapter config (r = 4). Returns one result per block."""
    torch.manual_seed(seed)
    model = Blocks(len(blocks))
    x = torch.randn(512, D)
    targets, truths = [], []
    for layer, (rows, cols) in zip(model.layers, blocks, strict=True):
        true = torch.zeros(D, D)
        u = (0.7 + 0.3 * torch.rand(rows, 1)) * torch.randn(rows, 1).sign()
        v = (0.7 + 0.3 * torch.rand(1, cols)) * torch.randn(1, cols).sign()
        true[:rows, :cols] = u @ v
        truths.append(true)
        # Noise: B @ A fits some of it everywhere, which the gate has to drop.
        targets.append(x @ (layer.q_proj.weight.detach() + true).T + 0.3 * torch.randn(512, D))
    y = torch.cat(targets, -1)
    cfg = AdapterConfig(
        targets=["q_proj"],
        r=4,
        alpha=4,
        granularity=granularity,
        threshold_training=threshold_training,
    )  # s = 1; fmt: skip
    adapter = Adapter(model, cfg)
    optimizer = adapter_optimizer(adapter, 1e-2, cfg)
    schedule = SparsitySchedule(steps)
    phi_at_reinit = None
    grads: list[torch.Tensor] = []
    for step in range(steps):
        batch = torch.randint(0, 512, (64,))

        def task_loss(batch: torch.Tensor = batch) -> torch.Tensor:
            return (model(x[batch]) - y[batch]).square().sum(-1).mean()  # nats-like scale

        f = schedule.f(step)
        train_step(adapter, optimizer, task_loss, f, reinit=step == schedule.t1)
        if step == schedule.t1:
            phi_at_reinit = adapter.thresholds.phi.detach().clone()
        if f > 0.0:
            grads.append(adapter.thresholds.phi.grad.clone())
    adapter.end_training()
    phi = adapter.thresholds.phi.detach()
    out = []
    for i, true in enumerate(truths):
        m = adapter.modules[f"layers.{i}.q_proj"]
        kept = (m.delta().abs() > m.theta()).detach()
        support = true != 0
        g = m.group
        out.append(
            {
                "phi_at_reinit": float(phi_at_reinit[g]),
                "phi": float(phi[g]),
                "grads": [float(grad[g]) for grad in grads],
                "density": float(kept.float().mean()),
                "jaccard": float((kept & support).sum() / (kept | support).sum()),
                "kept_is_truth": bool(kept.equal(support)),
                "true_density": float(support.float().mean()),
            }
        )
    return out


def test_theta_rises_by_its_own_gradient_and_the_support_approaches_the_true_one() -> None:
    [fit] = _fit([(4, 8)])  # 32 of 4096 entries; the re-init keeps r(d_in+d_out) = 512
    assert fit["phi"] > fit["phi_at_reinit"] + 0.5  # theta rose well above its re-init value
    # A gradient at every step while theta climbs through the noise (the first 25 steps of
    # the sparse phase); later it is zero where theta sits in the gap between noise and
    # signal, with no entry within the kernel window.
    assert all(g != 0.0 for g in fit["grads"][:25])
    # The kept support is the true one: density 32 / 4096 = 0.78 % (Jaccard 1).
    assert fit["kept_is_truth"], (fit["density"], fit["jaccard"])


def test_tasks_of_different_difficulty_end_at_different_densities() -> None:
    [easy] = _fit([(2, 8)], seed=1)  # 16 entries
    [hard] = _fit([(8, 32)], seed=2)  # 256 entries
    # Each ends on its true support: 16 / 4096 = 0.39 % and 256 / 4096 = 6.25 % dense.
    for fit in (easy, hard):
        assert fit["kept_is_truth"], (fit["density"], fit["jaccard"])
    assert easy["density"] == 16 / D**2 and hard["density"] == 256 / D**2


def test_per_block_thresholds_learn_a_density_per_block() -> None:
    small, large = _fit([(2, 8), (8, 32)], granularity="per_block", seed=3)
    assert small["phi"] != large["phi"]  # two thresholds, each learned
    # Side by side in one model, each block ends on its own true support (0.39 %, 6.25 %).
    for fit in (small, large):
        assert fit["kept_is_truth"], (fit["density"], fit["jaccard"])
    assert small["density"] == 16 / D**2 and large["density"] == 256 / D**2


def test_the_reference_preset_on_the_same_fit_stays_near_its_re_init() -> None:
    """The authors' threshold training (the named preset): theta absolute, Adam at lr 1e-3
    on log theta, no L0 term. On the fit where ours ends exactly on the truth, its theta
    log theta moves by at most about 1e-3 per sparse step (Adam's step size), so the
    support stays near the re-init's, far from the truth (ours ends on it, above): what
    docs/trainer.md reports of the reference."""
    [ref] = _fit([(4, 8)], threshold_training="reference")
    assert ref["phi_at_reinit"] < -4  # absolute: |dW| ~ 1e-2 here (ours: phi ~ -1.9)
    assert not ref["kept_is_truth"]
    assert ref["density"] > 5 * ref["true_density"]  # 6-7 % here, the truth 0.78 %
