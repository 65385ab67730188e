"""JumpLoRA: a gated low-rank update injected into named `nn.Linear` modules of any HF model.

For a frozen base weight W0 (d_out, d_in) and a fresh pair A (r, d_in), B (d_out, r):

    dW   = B @ A                                  (d_out, d_in) fp32, once per forward
    dW_t = f * J(dW) + (1 - f) * dW               one fused node (gate.signed_jump)
    y    = x @ (W0 + s * dW_t).T + b0             s = alpha / r, ONE dense matmul

Folding the update into the weight before the matmul costs one (d_out, d_in) add instead
of a second n x d_in x d_out matmul, and makes the f = 1 output equal the merged model's
output bit for bit (`effective_weight` is what both use). While f = 0 (and always with
`gate: none`) the update is dense and theta unused, so the classic factored LoRA path
x @ A.T @ B.T is used: it is cheaper and materialises no (d_out, d_in) tensor.

dW and the threshold comparison are computed in fp32 even under bf16 autocast, so the
gate, the budget threshold and the merge all see the same dW.

Memory per adapted matrix while training with the gate (on top of the frozen weights):
dW saved for the gate's backward (fp32, 4 bytes/entry) plus W0 + s*dW_t saved by the
matmul (compute dtype, 2 or 4 bytes/entry), i.e. 6-8 bytes per adapted weight entry.

Thresholds are owned by a `Thresholds` module: one log-threshold per group, where the
group is the whole model (`global`) or the transformer block (`per_block`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import AdapterConfig
from trainer.errors import TrainerError
from trainer.gate import signed_jump, step_density
from trainer.schedule import order_log_threshold

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class Thresholds(nn.Module):
    """The learnable log-thresholds phi, one per group; theta = exp(max(phi, floor)).

    The floor (a buffer, -inf unless `threshold_floor: budget`) is the order-statistic
    log-threshold of the adapter-parameter budget; below it phi gets no gradient.
    """

    def __init__(self, n_groups: int, init: float) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.full((n_groups,), float(init)))
        self.register_buffer("floor", torch.full((n_groups,), -math.inf))

    def theta(self, group: int) -> Tensor:
        return torch.maximum(self.phi[group], self.floor[group]).exp()

    def values(self) -> Tensor:
        return torch.maximum(self.phi, self.floor).exp().detach()


class JumpLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a JumpLoRA update. `f` is set by the training loop."""

    def __init__(
        self,
        base: nn.Linear,
        cfg: AdapterConfig,
        thresholds: Thresholds,
        group: int,
    ) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(cfg.r, d_in, device=device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, cfg.r, device=device))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = cfg.alpha / cfg.r
        self.gated = cfg.gate == "jump"
        self.eps = cfg.eps
        self.group = group
        self.f = 0.0
        self.keep_last_delta = cfg.l0_weight > 0.0  # only the L0 term reads it
        self.last_delta: Tensor | None = None  # detached dW of the last gated forward
        # Shared with other wrappers: kept out of the module tree so state dicts and
        # parameters() list it once, on the Adapter.
        object.__setattr__(self, "_thresholds", thresholds)

    def theta(self) -> Tensor:
        return self._thresholds.theta(self.group)

    def delta(self) -> Tensor:
        """dW = B @ A, (d_out, d_in), fp32 (also under autocast)."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return self.lora_B @ self.lora_A

    def gated_delta(self, f: float) -> Tensor:
        """dW_t = f * J(dW) + (1 - f) * dW, (d_out, d_in) fp32 (no gate: dW)."""
        dw = self.delta()
        if not self.gated or f == 0.0:
            return dw
        if self.keep_last_delta:
            self.last_delta = dw.detach()
        return signed_jump(dw, self.theta(), self.eps, f)

    def effective_weight(self, f: float, dtype: torch.dtype | None = None) -> Tensor:
        """W0 + s * dW_t, (d_out, d_in), in `dtype` (default: the base weight's).

        The training forward and the merge both call this, so the merged weights equal
        the weights the f = 1 forward multiplies by, bit for bit.
        """
        w0 = self.base.weight
        merged = torch.add(w0.float(), self.gated_delta(f), alpha=self.scaling)
        return merged.to(dtype or w0.dtype)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., d_in) -> (..., d_out)
        if not self.gated or self.f == 0.0:  # dense update: the factored LoRA path
            return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.effective_weight(self.f), self.base.bias)


def _block_of(name: str) -> int:
    match = _BLOCK_INDEX.search(name)
    if match is None:
        raise TrainerError(f"per_block thresholds: cannot find a block index in module {name!r}")
    return int(match.group(1))


def _is_target(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class Adapter:
    """One task's JumpLoRA wrappers in a model, plus the thresholds they share."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig) -> None:
        self.model = model
        self.cfg = cfg
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _is_target(name, cfg.targets)
        ]
        if not names:
            raise TrainerError(f"no nn.Linear module matches adapter targets {cfg.targets}")
        if cfg.granularity == "per_block":
            blocks = sorted({_block_of(n) for n in names})
            group_of = {n: blocks.index(_block_of(n)) for n in names}
        else:
            group_of = dict.fromkeys(names, 0)
        device = model.get_submodule(names[0]).weight.device
        self.thresholds = Thresholds(max(group_of.values()) + 1, cfg.init_log_threshold).to(device)
        self.modules: dict[str, JumpLoRALinear] = {}
        for name in names:
            wrapper = JumpLoRALinear(
                model.get_submodule(name), cfg, self.thresholds, group_of[name]
            )
            self._replace(name, wrapper)
            self.modules[name] = wrapper

    def _replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, module)

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules.values():
            yield m.lora_A
            yield m.lora_B

    def set_f(self, f: float) -> None:
        for m in self.modules.values():
            m.f = f

    @torch.no_grad()
    def budget_log_thresholds(self) -> Tensor:
        """Per group: the log-threshold keeping as many dW entries as the adapter has parameters."""
        out = torch.empty_like(self.thresholds.phi)
        for group in range(out.numel()):
            members = [m for m in self.modules.values() if m.group == group]
            values = torch.cat([m.delta().abs().reshape(-1) for m in members])
            budget = sum(m.lora_A.numel() + m.lora_B.numel() for m in members)
            out[group] = order_log_threshold(values, budget).to(out.device)
        return out

    @torch.no_grad()
    def reinit_thresholds(self) -> None:
        """phi <- the budget order statistic (at step t1 of the schedule)."""
        self.thresholds.phi.copy_(self.budget_log_thresholds())

    @torch.no_grad()
    def update_floor(self) -> None:
        """Re-apply the budget order statistic as a floor under the learned theta."""
        if self.cfg.threshold_floor == "budget":
            self.thresholds.floor.copy_(self.budget_log_thresholds())

    def l0_term(self) -> Tensor:
        """Mean over adapted matrices of the surviving fraction (STE gradient to theta only)."""
        terms = [
            step_density(m.last_delta, m.theta(), m.eps)
            for m in self.modules.values()
            if m.last_delta is not None
        ]
        return torch.stack(terms).mean() if terms else torch.zeros(())

    @torch.no_grad()
    def density(self) -> float:
        """Fraction of dW entries the gate keeps at the current theta (1.0 without gate)."""
        if self.cfg.gate != "jump":
            return 1.0
        kept = sum(int((m.delta().abs() > m.theta()).sum()) for m in self.modules.values())
        total = sum(m.lora_B.shape[0] * m.lora_A.shape[1] for m in self.modules.values())
        return kept / total

    @torch.no_grad()
    def merged_weights(self, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """New base weights W0 + s*J(dW) (f = 1), by HF parameter name, on CPU, each in the
        dtype of the same-named tensor of `like` (the checkpoint; default: the base weight's).

        Every result is checked for non-finite values before anything is returned, so a
        failed merge leaves the model as it was (PEFT's safe_merge).
        """
        merged: dict[str, Tensor] = {}
        for name, m in self.modules.items():
            dtype = (like[name + ".weight"] if like is not None else m.base.weight).dtype
            w = m.effective_weight(1.0, dtype).cpu()  # (d_out, d_in)
            if not torch.isfinite(w).all():
                raise TrainerError(f"merge of {name} produced non-finite weights; nothing merged")
            merged[name + ".weight"] = w
        return merged

    @torch.no_grad()
    def commit(self, merged: dict[str, Tensor]) -> None:
        """Write merged weights into the base layers and unload the wrappers."""
        for name, m in self.modules.items():
            m.base.weight.copy_(merged[name + ".weight"].to(m.base.weight.dtype))
        self.unload()

    @contextlib.contextmanager
    def serving(self, merged: dict[str, Tensor]) -> Iterator[None]:
        """Temporarily serve `merged` through plain layers (evaluation), then restore."""
        modules = dict(self.modules)
        saved = {n: m.base.weight.detach().clone() for n, m in modules.items()}
        self.commit(merged)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, m in modules.items():
                    m.base.weight.copy_(saved[name])
                    self._replace(name, m)
            self.modules = modules

    def unload(self) -> None:
        """Put the plain base layers back (their weights are left as they are)."""
        for name, m in self.modules.items():
            self._replace(name, m.base)
        self.modules = {}
