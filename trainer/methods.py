"""Continual-learning methods as plug-ins on the task loop's named events.

Events (called by trainer.loop in this order for every task):
    start_task(model, task_index) -> Adapter     the adapter to train on this task
    extra_loss(adapter, f)        -> {name: loss} added to the cross-entropy each step
    end_task(adapter, merged)     -> Adapter|None merged = W0 + s*J(dW) per adapted weight;
                                                  return the adapter to keep, if any
    eval_view(adapter, merged)    -> context     the model state evaluation must see
    state_dict / load_state_dict                 what `--resume` needs besides checkpoints

The gate (adapter.gate: jump|none) lives in the adapter, so it composes with every method.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from trainer.adapter import Adapter
from trainer.config import RunConfig
from trainer.errors import TrainerError


class Method:
    """IncLoRA: a fresh adapter per task; after the task it is merged and unloaded."""

    commits = True  # the merged weights become the next task's base weights

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task_index = 0

    def start_task(self, model: nn.Module, task_index: int) -> Adapter:
        self.task_index = task_index
        return Adapter(model, self.cfg.adapter)

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

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.adapter: Adapter | None = None

    def start_task(self, model: nn.Module, task_index: int) -> Adapter:
        self.task_index = task_index
        if self.adapter is None:
            self.adapter = Adapter(model, self.cfg.adapter)
        with torch.no_grad():
            self.adapter.thresholds.phi.fill_(self.cfg.adapter.init_log_threshold)
            self.adapter.thresholds.floor.fill_(-math.inf)
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


class Ella(Method):
    """IncLoRA + lambda * mean_m ||dW_hat_t (.) W_past||_F^2 (coordinate-wise overlap penalty).

    W_past = sum of earlier tasks' s*J(dW) (detached); dW_hat_t = s*(f*J(dW) + (1-f)*dW)
    with the gate mask treated as a constant, so ELLA sends no gradient to theta.
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.w_past: dict[str, Tensor] = {}  # module name -> (d_out, d_in) fp32

    def extra_loss(self, adapter: Adapter, f: float) -> dict[str, Tensor]:
        if not self.w_past:
            return {"ella": torch.zeros((), device=adapter.thresholds.phi.device)}
        terms = []
        for name, m in adapter.modules.items():
            dw = m.delta()  # (d_out, d_in)
            if m.gated and f > 0.0:
                mask = (dw.detach().abs() > m.theta().detach()).to(dw.dtype)
                dw = f * dw * mask + (1.0 - f) * dw
            terms.append((m.scaling * dw * self.w_past[name]).square().sum())
        lam = self.cfg.method.ella_lambda_for(self.task_index)
        return {"ella": lam * torch.stack(terms).mean()}

    @torch.no_grad()
    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        for name, m in adapter.modules.items():
            update = m.scaling * m.gated_delta(1.0)
            self.w_past[name] = self.w_past[name] + update if name in self.w_past else update
        return super().end_task(adapter, merged)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{n}.w_past": t.cpu() for n, t in self.w_past.items()}

    def load_state_dict(self, state: dict[str, Tensor], model: nn.Module) -> Adapter | None:
        device = next(model.parameters()).device
        self.w_past = {k.removesuffix(".w_past"): t.to(device) for k, t in state.items()}
        return None


class OLora(Method):
    """IncLoRA + lambda * sum_m sum |A_past^(m) @ A_t^(m).T| (O-LoRA's orthogonality loss).

    Unlike the original O-LoRA, earlier adapters are merged (as in IncLoRA); only their A
    matrices are kept, to span the subspaces the new adapter must stay orthogonal to.
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.past_a: dict[str, Tensor] = {}  # module name -> (r * tasks so far, d_in)

    def extra_loss(self, adapter: Adapter, f: float) -> dict[str, Tensor]:
        if not self.past_a:
            return {"olora": torch.zeros((), device=adapter.thresholds.phi.device)}
        total = sum(
            (self.past_a[name] @ m.lora_A.T).abs().sum() for name, m in adapter.modules.items()
        )
        return {"olora": self.cfg.method.olora_lambda * total}

    @torch.no_grad()
    def end_task(self, adapter: Adapter, merged: dict[str, Tensor]) -> Adapter | None:
        for name, m in adapter.modules.items():
            a = m.lora_A.detach().clone()
            self.past_a[name] = torch.cat([self.past_a[name], a]) if name in self.past_a else a
        return super().end_task(adapter, merged)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{n}.past_A": t.cpu() for n, t in self.past_a.items()}

    def load_state_dict(self, state: dict[str, Tensor], model: nn.Module) -> Adapter | None:
        device = next(model.parameters()).device
        self.past_a = {k.removesuffix(".past_A"): t.to(device) for k, t in state.items()}
        return None


METHODS: dict[str, type[Method]] = {
    "incLoRA": IncLoRA,
    "seqLoRA": SeqLoRA,
    "ella": Ella,
    "olora": OLora,
}


def build_method(cfg: RunConfig) -> Method:
    try:
        return METHODS[cfg.method.name](cfg)
    except KeyError:
        raise TrainerError(
            f"unknown method {cfg.method.name!r}; choose from {sorted(METHODS)}"
        ) from None
