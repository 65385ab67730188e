"""One optimizer step of a JumpLoRA adapter, shared by the task loop, the step-time
benchmark and the gate's tests, so the three cannot drift apart.

    begin_step(f, reinit)    dW = B @ A once per adapted matrix; threshold scale refreshed
                             (re-initialised at the schedule's t1)
    loss = task loss + method extras + l0_weight * f * kept fraction   (gate: jump)
    backward; clip the adapter gradients; optimizer step; end_step

`grouped_loss` is the task loss of a right-padded batch computed in groups of rows of like
length, each group cut to its longest row: the same value and gradient as one padded
forward, without the padding's compute (the loop uses it on the CPU, in one process).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.adapter import Adapter
from trainer.config import AdapterConfig
from trainer.data import scored_targets

# Groups of fewer rows cost more per token than the padding they save: on SmolLM2 (CPU,
# fp32, 2 threads, load 4), four batches of 8 amazon rows of the CL benchmark took 0.97x
# the padded batches' forward and backward time as single rows, 0.85x as pairs and 0.77x
# as groups of 4 (measured once; bench/train_step.py --padding times the loop's step).
MIN_GROUP_ROWS = 4


def length_groups(lengths: list[int], min_rows: int = MIN_GROUP_ROWS) -> list[list[int]]:
    """Row indices in groups of like length: the rows sorted by length and cut into
    consecutive groups of at least `min_rows` rows with the fewest padded tokens in all
    (each group padded to its longest row), by dynamic programming over the cut points."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    if n < 2 * min_rows:  # no room for two groups
        return [order] if order else []
    # best[k]: fewest padded tokens for the first k sorted rows; cut[k]: where its last
    # group starts. Only k = 0 or k >= min_rows can end a group.
    best = [0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(min_rows, n + 1):
        for start in [0, *range(min_rows, end - min_rows + 1)]:
            tokens = best[start] + (end - start) * lengths[order[end - 1]]
            if tokens < best[end]:
                best[end], cut[end] = tokens, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def grouped_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The causal-LM loss of a right-padded batch (input_ids, attention_mask, labels; (B, L)):
    the mean cross-entropy over its target tokens, computed group by group
    (`length_groups`), each group cut to its longest row. Right padding is what makes this
    exact: a row's tokens never attend to the padding after them, and their positions do
    not change. Each group's sum is divided by the whole batch's target-token count, so
    the groups add up to the batch's mean (value and gradient; float summation order
    aside)."""
    mask = batch["attention_mask"]  # (B, L)
    lengths = mask.sum(dim=1)  # (B,)
    columns = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask.bool(), columns < lengths[:, None]):
        raise ValueError("grouped_loss needs a right-padded batch (ones, then zeros, per row)")
    count = scored_targets(batch["labels"])
    total = torch.zeros((), device=lengths.device)
    for rows in length_groups(lengths.tolist()):
        index = torch.tensor(rows, device=lengths.device)
        width = int(lengths[index].max())
        group = {key: value[index, :width] for key, value in batch.items()}  # (b, width)
        total = total + model(**group, num_items_in_batch=count).loss
    return total


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
