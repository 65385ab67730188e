"""JumpLoRA: a gated low-rank update injected into named `nn.Linear` modules of any HF model.

For a frozen base weight W0 (d_out, d_in) and a fresh pair A (r, d_in), B (d_out, r):

    dW   = B @ A                                  (d_out, d_in) fp32, once per step
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

Thresholds are owned by a `Thresholds` module: one learned log-threshold per group, where
the group is the whole model (`global`) or the transformer block (`per_block`), in units of
the group's RMS(dW): theta = exp(phi) * RMS(dW) (the reference preset: theta = exp(phi)).
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
from trainer.gate import kept_fraction, signed_jump
from trainer.schedule import MIN_THETA, order_log_threshold

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class Thresholds(nn.Module):
    """The learnable log-thresholds, one per group: theta_g = exp(phi_g) * scale_g.

    `scale` (a buffer, detached) is the RMS of the group's dW entries, refreshed at every
    step, so phi is the threshold in units of the update's own size: an update that grows
    uniformly keeps its density, and phi moves only by its gradient (the task loss pulls
    theta down, the L0 term pushes it up). Under `threshold_training: reference` scale stays
    1 (theta is absolute, as the authors train it). With `gate: topk` phi is not learned:
    scale is 1 and phi is the budget order statistic, recomputed every step (the
    fixed-ratio rival). `ready` is set once phi has been re-initialised from a non-zero dW.
    """

    def __init__(self, n_groups: int) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.zeros(n_groups))
        self.register_buffer("scale", torch.ones(n_groups))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def theta(self, group: int) -> Tensor:
        return self.phi[group].exp() * self.scale[group]

    def values(self) -> Tensor:
        return (self.phi.exp() * self.scale).detach()

    @torch.no_grad()
    def reset(self) -> None:
        """A fresh threshold (a new task of SeqLoRA)."""
        self.phi.zero_()
        self.scale.fill_(1.0)
        self.ready.fill_(False)


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
        self.gated = cfg.gate != "none"
        self.bandwidth = cfg.bandwidth
        self.reference = cfg.threshold_training == "reference"
        self.group = group
        self.f = 0.0
        self.step_delta: Tensor | None = None  # dW of the current step (Adapter.begin_step)
        # Shared with other wrappers: kept out of the module tree so state dicts and
        # parameters() list it once, on the Adapter.
        object.__setattr__(self, "_thresholds", thresholds)

    @property
    def numel(self) -> int:
        """Entries of the update dW, d_out * d_in."""
        return self.lora_B.shape[0] * self.lora_A.shape[1]

    def theta(self) -> Tensor:
        return self._thresholds.theta(self.group)

    def _kernel_width(self, theta: Tensor) -> Tensor | float:
        """The STE bandwidth eps: bandwidth * theta (ours), or absolute (reference)."""
        return self.bandwidth if self.reference else self.bandwidth * theta.detach()

    def delta(self) -> Tensor:
        """dW = B @ A, (d_out, d_in), fp32 (also under autocast)."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return self.lora_B @ self.lora_A

    def current_delta(self) -> Tensor:
        """This step's dW when the adapter computed it already, else a fresh B @ A."""
        return self.step_delta if self.step_delta is not None else self.delta()

    def gated_delta(self, f: float, learn_threshold: bool = True) -> Tensor:
        """dW_t = f * J(dW) + (1 - f) * dW, (d_out, d_in) fp32 (no gate: dW).

        learn_threshold=False treats theta as a constant (ELLA's penalty: no gradient to it).
        """
        dw = self.current_delta()
        if not self.gated or f == 0.0:
            return dw
        theta = self.theta() if learn_threshold else self.theta().detach()
        return signed_jump(dw, theta, self._kernel_width(theta), f, mean=self.reference)

    def kept_fraction(self) -> Tensor:
        """Fraction of this step's dW entries the gate keeps (STE gradient to theta only)."""
        theta = self.theta()
        return kept_fraction(self.current_delta().detach(), theta, self._kernel_width(theta))

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


def block_index(name: str) -> int | None:
    """The transformer block of a module or weight name ('model.layers.7.self_attn.q_proj'
    -> 7); None for a name outside the numbered blocks."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def _block_of(name: str) -> int:
    index = block_index(name)
    if index is None:
        raise TrainerError(f"per_block thresholds: cannot find a block index in module {name!r}")
    return index


def _is_target(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class Adapter:
    """One task's JumpLoRA wrappers in a model, plus the thresholds they share.

    Per optimizer step the loop calls `begin_step(f, reinit)` (computes every dW = B @ A
    once, refreshes the threshold scale; re-initialises phi at the schedule's t1), runs
    the forward and backward, and `end_step()`; `end_training()` syncs the threshold with
    the final dW before the merge.
    """

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
        self.thresholds = Thresholds(max(group_of.values()) + 1).to(device)
        self.thresholds.phi.requires_grad_(cfg.gate == "jump")  # topk: not learned
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

    def _groups(self) -> list[list[JumpLoRALinear]]:
        groups: list[list[JumpLoRALinear]] = [[] for _ in range(self.thresholds.phi.numel())]
        for m in self.modules.values():
            groups[m.group].append(m)
        return groups

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules.values():
            yield m.lora_A
            yield m.lora_B

    def set_f(self, f: float) -> None:
        for m in self.modules.values():
            m.f = f

    # ------------------------------------------------------------------ per step

    def begin_step(self, f: float, reinit: bool = False) -> None:
        """Set f; with the gate on (f > 0) or at the re-init step, compute each dW once for
        the forward, the threshold, the L0 term and ELLA to share; refresh the threshold."""
        self.set_f(f)
        if self.cfg.gate == "none" or (f == 0.0 and not reinit):
            return
        with torch.set_grad_enabled(f > 0.0 and torch.is_grad_enabled()):
            for m in self.modules.values():
                m.step_delta = m.delta()
        if reinit:
            self.reinit_thresholds()
        else:
            self._refresh_thresholds()
        if f == 0.0:  # the re-init step is still dense: the forward needs no dW
            self.end_step()

    def end_step(self) -> None:
        for m in self.modules.values():
            m.step_delta = None

    @torch.no_grad()
    def end_training(self) -> None:
        """Sync the threshold with the final dW (the last optimizer step moved it), so the
        merge sees the threshold as the forward defines it; re-initialise if the task was too
        short to reach t1."""
        if self.cfg.gate == "none":
            return
        if bool(self.thresholds.ready):
            self._refresh_thresholds()
        else:
            self.reinit_thresholds()
        self.end_step()

    # ------------------------------------------------------------------ thresholds

    def _budget(self, members: list[JumpLoRALinear]) -> int:
        """Entries the order statistic keeps: as many as the group's adapter parameters, or
        `topk_density` of its entries (a top-k gate at a chosen density)."""
        if self.cfg.topk_density is not None:  # (gate: topk only, the config checks)
            return round(self.cfg.topk_density * sum(m.numel for m in members))
        return sum(m.lora_A.numel() + m.lora_B.numel() for m in members)

    @torch.no_grad()
    def _rms(self, members: list[JumpLoRALinear]) -> Tensor:
        squares = sum(m.current_delta().square().sum() for m in members)
        return (squares / sum(m.numel for m in members)).sqrt().clamp_min(MIN_THETA)

    @torch.no_grad()
    def _refresh_thresholds(self) -> None:
        """jump: scale <- RMS(dW) per group (phi is learned; the reference's theta is
        absolute, scale stays 1); topk: phi <- the budget order statistic of this step's dW
        (an exact count every step)."""
        for group, members in enumerate(self._groups()):
            if self.cfg.gate == "topk":
                values = torch.cat([m.current_delta().abs().reshape(-1) for m in members])
                self.thresholds.phi[group] = order_log_threshold(values, self._budget(members))
            elif self.cfg.threshold_training == "ours":
                self.thresholds.scale[group] = self._rms(members)

    @torch.no_grad()
    def reinit_thresholds(self) -> None:
        """phi <- the budget order statistic (ref, at step t1): as many dW entries survive as
        the adapter has parameters (topk_density: that share); then phi is learned (jump)
        or re-applied (topk)."""
        for group, members in enumerate(self._groups()):
            values = torch.cat([m.current_delta().abs().reshape(-1) for m in members])
            phi = order_log_threshold(values, self._budget(members)).to(values.device)
            if self.cfg.gate == "jump" and self.cfg.threshold_training == "ours":
                scale = self._rms(members)
                self.thresholds.scale[group] = scale
                phi = phi - scale.log()
            self.thresholds.phi[group] = phi
        self.thresholds.ready.fill_(
            bool(any(m.current_delta().any() for m in self.modules.values()))
        )

    def l0_term(self) -> Tensor:
        """Fraction of all adapted dW entries the gate keeps this step (the L0 term of
        JumpReLU SAEs; STE gradient to theta only)."""
        numel = [m.numel for m in self.modules.values()]
        kept = sum(n * m.kept_fraction() for n, m in zip(numel, self.modules.values(), strict=True))
        return kept / sum(numel)

    @torch.no_grad()
    def density(self) -> float:
        """Fraction of dW entries the gate keeps at the current theta (1.0 without gate)."""
        if self.cfg.gate == "none":
            return 1.0
        kept = sum(int((m.current_delta().abs() > m.theta()).sum()) for m in self.modules.values())
        total = sum(m.numel for m in self.modules.values())
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
