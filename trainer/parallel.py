"""Several processes (`torchrun --nproc_per_node N -m trainer ...`): the same training as one
process at the same global batch, only faster.

Three things make N processes equal to one (up to float summation order):
- The data: every rank draws the single-process shuffle (same seeded generator, same global
  batches of `train.batch_size`) and takes its contiguous share of each global batch
  (`RankBatches`). A rank whose share would be empty (a last batch shorter than N) gets a
  copy of an example with no target tokens: it adds nothing to the loss or the gradient.
- The loss: each rank's cross-entropy is its sum over target tokens divided by the global
  batch's target-token count / N, so DDP's gradient average is the gradient of the global
  batch's token mean (a mean of per-rank means would weight ranks with fewer target tokens
  more). The returned loss value is the global mean, identical on every rank.
- The thresholds phi: their gradient is averaged across ranks (a hook, as soon as backward
  has accumulated it, so gradient clipping after backward sees the average), like DDP
  averages the adapter's. The hook's all-reduce comes at the same point of every rank's
  backward (same graph), so the collectives stay in order. They stay outside the DDP module:
  phi gets no gradient while f = 0 (and never without the gate), which DDP only accepts
  with `find_unused_parameters` or a zero-valued term that turns phi's missing gradient
  into a zero one, and AdamW counts a zero gradient as a step (measured: theta 4 % away
  from the single process after one task). Everything in the DDP module gets a gradient at
  every step (the frozen base weights and InfLoRA's frozen A do not require grad), so DDP
  runs without `find_unused_parameters`. phi starts equal on every rank (its init value;
  the re-init at step t1 reads dW, identical on every rank) and so stays equal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, Dataset, RandomSampler, Sampler
from torch.utils.hooks import RemovableHandle

from trainer.adapter import Adapter
from trainer.data import scored_targets

Example = tuple[list[int], list[int]]  # (prompt ids, target ids)


def world() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) without torch.distributed."""
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Examples(Dataset):
    """Training examples; index ~k (= -1 - k) is example k without a target (no loss)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        if index >= 0:
            return self.examples[index]
        prompt, target = self.examples[~index]
        return prompt + target, []


class RankBatches(Sampler[list[int]]):
    """This rank's contiguous share of each global batch of `batches` (sizes differ by at
    most one across ranks; an empty share becomes [~first index of the batch])."""

    def __init__(self, batches: Sampler[list[int]], world_size: int, rank: int) -> None:
        self.batches, self.world_size, self.rank = batches, world_size, rank

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            size, extra = divmod(len(batch), self.world_size)
            start = self.rank * size + min(self.rank, extra)
            share = batch[start : start + size + (self.rank < extra)]
            yield share or [~batch[0]]


def global_batches(n: int, batch_size: int, generator: torch.Generator) -> RankBatches:
    """The single-process shuffle in global batches (DataLoader(shuffle=True) with the same
    generator draws the same), shared out across the ranks."""
    sampler = RandomSampler(range(n), generator=generator)
    return RankBatches(BatchSampler(sampler, batch_size, drop_last=False), *world())


class _TokenMeanLoss(nn.Module):
    """The model, with the cross-entropy normalised by the global target-token count."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Tensor) -> Any:
        world_size = dist.get_world_size()
        count = scored_targets(batch["labels"]).float()
        dist.all_reduce(count)  # the global target-token count (the causal LM shifts by one)
        out = self.model(**batch, num_items_in_batch=count / world_size)
        mean = out.loss.detach().clone()
        dist.all_reduce(mean)
        # Value: the global batch's mean loss; gradient: this rank's share of it.
        out.loss = out.loss + (mean / world_size - out.loss.detach())
        return out


def _average_grad(param: Tensor) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


_threshold_hooks: list[RemovableHandle] = []  # of the task being trained


def data_parallel(model: nn.Module, adapter: Adapter, device: torch.device) -> nn.Module:
    """DDP over the model (see the module doc); the adapter's thresholds get their gradient
    averaged across ranks as soon as backward has accumulated it."""
    while _threshold_hooks:
        _threshold_hooks.pop().remove()  # the previous task's (SeqLoRA keeps its thresholds)
    for param in adapter.thresholds.parameters():
        _threshold_hooks.append(param.register_post_accumulate_grad_hook(_average_grad))
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_TokenMeanLoss(model), device_ids=device_ids)
