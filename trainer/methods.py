"""Continual-learning methods as plug-ins on the task loop's named events.

Events (called by trainer.loop in this order for every task):
    start_task(model, task_index) -> Adapter     the adapter to train on this task
    prepare_task(adapter, feed)                  before training; feed() runs the model over
                                                  the task's training inputs (no grad)
    extra_loss(adapter, f)        -> {name: loss} added to the cross-entropy each step
    end_task(adapter, merged)     -> Adapter|None merged = W0 + s*J(dW) per adapted weight;
                                                  return the adapter to keep, if any
    eval_view(adapter, merged)    -> context     the model state evaluation must see
    state_dict / load_state_dict                 what `--resume` needs besides checkpoints

The gate (adapter.gate: jump|none) lives in the adapter, so it composes with every method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainer.adapter import Adapter
from trainer.config import RunConfig
from trainer.errors import TrainerError
from trainer.subspace import down_projection, extend_basis, input_covariances


class Method:
    """IncLoRA: a fresh adapter per task; after the task it is merged and unloaded."""

    commits = True  # the merged weights become the next task's base weights

    def __init__(self, cfg: RunConfig, n_tasks: int) -> None:
        self.cfg = cfg
        self.n_tasks = n_tasks
        self.task_index = 0

    def start_task(self, model: nn.Module, task_index: int) -> Adapter:
        self.task_index = task_index
        return Adapter(model, self.cfg.adapter)

    def prepare_task(self, adapter: Adapter, feed: Callable[[], None]) -> None:
        return None

    def extra_loss(self, adapter: Adapter, f: float) -> dict[str, Tensor]:
        return {}

    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        adapter.commit(merged)
        return None

    def eval_view(self, adapter: Adapter | None, merged: dict[str, Tensor]):
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor], model: nn.Module) -> Adapter | None:
        return None


IncLoRA = Method


class SeqLoRA(Method):
    """One adapter trained on every task in turn; the base weights never change.

    Each task gets a fresh theta and its own schedule; the exported checkpoint after task
    i is W0 + s*J(B_i @ A_i).
    """

    commits = False

    def __init__(self, cfg: RunConfig, n_tasks: int) -> None:
        super().__init__(cfg, n_tasks)
        self.adapter: Adapter | None = None

    def start_task(self, model: nn.Module, task_index: int) -> Adapter:
        self.task_index = task_index
        if self.adapter is None:
            self.adapter = Adapter(model, self.cfg.adapter)
        self.adapter.thresholds.reset()
        return self.adapter

    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        return adapter

    def eval_view(self, adapter: Adapter | None, merged: dict[str, Tensor]):
        return adapter.serving(merged) if adapter is not None else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Tensor]:
        if self.adapter is None:
            return {}
        state = {}
        for name, m in self.adapter.modules.items():
            state[f"{name}.lora_A"] = m.lora_A.detach().cpu()
            state[f"{name}.lora_B"] = m.lora_B.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Tensor], model: nn.Module) -> Adapter | None:
        if not state:
            return None
        self.adapter = Adapter(model, self.cfg.adapter)
        with torch.no_grad():
            for name, m in self.adapter.modules.items():
                m.lora_A.copy_(state[f"{name}.lora_A"])
                m.lora_B.copy_(state[f"{name}.lora_B"])
        return self.adapter


class _PastMemory(Method):
    """IncLoRA plus one tensor per adapted module summarising earlier tasks (`self.past`),
    saved for `--resume` under the key `<module>.<STATE_KEY>`."""

    STATE_KEY = "past"

    def __init__(self, cfg: RunConfig, n_tasks: int) -> None:
        super().__init__(cfg, n_tasks)
        self.past: dict[str, Tensor] = {}  # module name -> tensor, on the model's device

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{n}.{self.STATE_KEY}": t.cpu() for n, t in self.past.items()}

    def load_state_dict(self, state: dict[str, Tensor], model: nn.Module) -> Adapter | None:
        device = next(model.parameters()).device
        suffix = f".{self.STATE_KEY}"
        self.past = {k.removesuffix(suffix): t.to(device) for k, t in state.items()}
        return None


class Ella(_PastMemory):
    """IncLoRA + lambda * mean_m ||dW_hat_t (.) W_past||_F^2 (coordinate-wise overlap penalty).

    past = W_past (d_out, d_in) fp32 = sum of earlier tasks' s*J(dW) (detached);
    dW_hat_t = s*(f*J(dW) + (1-f)*dW) with theta detached (the mask is a constant), so
    ELLA sends no gradient to theta.
    """

    STATE_KEY = "w_past"

    def extra_loss(self, adapter: Adapter, f: float) -> dict[str, Tensor]:
        if not self.past:
            return {"ella": torch.zeros((), device=adapter.thresholds.phi.device)}
        terms = []
        for name, m in adapter.modules.items():
            dw = m.gated_delta(f, learn_threshold=False)  # (d_out, d_in)
            terms.append((m.scaling * dw * self.past[name]).square().sum())
        lam = self.cfg.method.ella_lambda_for(self.task_index)
        return {"ella": lam * torch.stack(terms).mean()}

    @torch.no_grad()
    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        for name, m in adapter.modules.items():
            update = m.scaling * m.gated_delta(1.0)  # (d_out, d_in)
            self.past[name] = self.past[name] + update if name in self.past else update
        return super().end_task(adapter, merged)


class OLora(_PastMemory):
    """IncLoRA + lambda * sum_m sum |A_past^(m) @ A_t^(m).T| (O-LoRA's orthogonality loss).

    Unlike the original O-LoRA, earlier adapters are merged (as in IncLoRA); only their A
    matrices are kept (past: (r * tasks so far, d_in)), to span the subspaces the new
    adapter must stay orthogonal to.
    """

    STATE_KEY = "past_A"

    def extra_loss(self, adapter: Adapter, f: float) -> dict[str, Tensor]:
        if not self.past:
            return {"olora": torch.zeros((), device=adapter.thresholds.phi.device)}
        total = sum(
            (self.past[name] @ m.lora_A.T).abs().sum()  # (r * tasks, r)
            for name, m in adapter.modules.items()
        )
        return {"olora": self.cfg.method.olora_lambda * total}

    @torch.no_grad()
    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        for name, m in adapter.modules.items():
            a = m.lora_A.detach().clone()  # (r, d_in)
            self.past[name] = torch.cat([self.past[name], a]) if name in self.past else a
        return super().end_task(adapter, merged)


class InfLoRA(_PastMemory):
    """IncLoRA whose A_t is designed, not learned (InfLoRA, Liang & Li, CVPR 2024).

    Before training, one pass over the task's inputs gives each adapted layer's input
    covariance C; A_t = the top-r directions of C outside the memory (trainer.subspace),
    frozen; only B_t trains, so dW_t = B_t A_t is zero on earlier tasks' input subspace.
    After the merge, a second pass (on the merged model) extends the memory with the new
    task's input directions (past: (d_in, k) orthonormal basis per layer, float64).
    The gate (adapter.gate) then acts on dW_t entry-wise, which keeps the update sparse but
    not exactly inside A_t's row space: orthogonality is exact with gate none only.
    """

    STATE_KEY = "input_basis"

    def __init__(self, cfg: RunConfig, n_tasks: int) -> None:
        super().__init__(cfg, n_tasks)
        self.feed: Callable[[], None] | None = None

    @torch.no_grad()
    def prepare_task(self, adapter: Adapter, feed: Callable[[], None]) -> None:
        self.feed = feed  # the memory update after the task reads the same inputs
        covariances = input_covariances(adapter.model, list(adapter.modules), feed)
        for name, m in adapter.modules.items():
            a = down_projection(covariances[name], self.past.get(name), m.lora_A.shape[0])
            m.lora_A.copy_(a)
            m.lora_A.requires_grad_(False)

    @torch.no_grad()
    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        names, model = list(adapter.modules), adapter.model
        super().end_task(adapter, merged)  # the pass below sees the merged weights
        if self.feed is None:
            raise TrainerError("InfLoRA: end_task before prepare_task")
        covariances = input_covariances(model, names, self.feed)
        threshold = self.cfg.method.inflora_threshold_for(self.task_index, self.n_tasks)
        for name in names:
            self.past[name] = extend_basis(self.past.get(name), covariances[name], threshold)
        self.feed = None
        return None


METHODS: dict[str, type[Method]] = {
    "incLoRA": IncLoRA,
    "seqLoRA": SeqLoRA,
    "ella": Ella,
    "olora": OLora,
    "inflora": InfLoRA,
}


def build_method(cfg: RunConfig, n_tasks: int) -> Method:
    """The configured method for a stream of `n_tasks` tasks."""
    lam = cfg.method.ella_lambda
    if cfg.method.name == "ella" and isinstance(lam, list) and len(lam) != n_tasks:
        raise TrainerError(
            f"method.ella_lambda lists {len(lam)} values; the stream has {n_tasks} tasks"
        )
    return METHODS[cfg.method.name](cfg, n_tasks)
