"""One optimizer step of a JumpLoRA adapter, shared by the task loop, the step-time
benchmark and the gate's tests, so the three cannot drift apart.

    begin_step(f, reinit)    dW = B @ A once per adapted matrix; threshold scale refreshed
                             (re-initialised at the schedule's t1)
    loss = task loss + method extras + l0_weight * f * kept fraction   (gate: jump)
    backward; clip the adapter gradients; optimizer step; end_step
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.adapter import Adapter
from trainer.config import AdapterConfig


def adapter_optimizer(adapter: Adapter, lr: float, cfg: AdapterConfig) -> torch.optim.Optimizer:
    """AdamW over A and B; with the learned gate, phi in its own group at threshold_lr."""
    groups: list[dict] = [{"params": list(adapter.lora_parameters())}]
    if cfg.gate == "jump":
        groups.append({"params": [adapter.thresholds.phi], "lr": cfg.threshold_lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


@dataclass
class StepResult:
    loss: float  # the task loss alone
    extras: dict[str, float] = field(default_factory=dict)
    density: float | None = None  # kept fraction at this step (when asked for)
    grad_norm: float = 0.0  # global norm of the adapter gradients, before clipping


def train_step(
    adapter: Adapter,
    optimizer: torch.optim.Optimizer,
    task_loss: Callable[[], Tensor],
    f: float,
    *,
    reinit: bool = False,
    extra_loss: Callable[[Adapter, float], dict[str, Tensor]] | None = None,
    grad_clip: float | None = None,
    measure_density: bool = False,
) -> StepResult:
    adapter.begin_step(f, reinit=reinit)
    try:
        loss = task_loss()
        extras = dict(extra_loss(adapter, f)) if extra_loss is not None else {}
        l0_weight = adapter.cfg.l0_weight if adapter.cfg.gate == "jump" else 0.0
        if l0_weight > 0.0 and f > 0.0:
            # The L0 term weighs as much of the update as the gate does (f).
            extras["l0"] = l0_weight * f * adapter.l0_term()
        optimizer.zero_grad(set_to_none=True)
        (loss + sum(extras.values())).backward()
        params = [p for p in adapter.lora_parameters() if p.grad is not None]
        max_norm = grad_clip if grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        optimizer.step()
        density = None
        if measure_density:
            density = adapter.density() if f > 0.0 else 1.0
        return StepResult(
            loss=loss.item(),
            extras={k: v.item() for k, v in extras.items()},
            density=density,
            grad_norm=float(grad_norm),
        )
    finally:
        adapter.end_step()
