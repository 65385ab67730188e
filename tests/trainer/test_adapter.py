"""JumpLoRA wrapper: exact forward at f=1, exact merge/unload, re-init counts, targets."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapter import Adapter
from trainer.config import AdapterConfig
from trainer.errors import TrainerError
from trainer.gate import signed_jump
from trainer.schedule import SparsitySchedule, order_log_threshold


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(48, 32, bias=True)
        self.v_proj = nn.Linear(48, 16, bias=False)
        self.up_proj = nn.Linear(48, 40, bias=False)


class Toy(nn.Module):
    """Same module names as an HF decoder (model.layers.<i>.<proj>)."""

    def __init__(self, n_blocks: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [torch.cat([b.q_proj(x), b.v_proj(x), b.up_proj(x)], -1) for b in self.layers], -1
        )


def _trained_adapter(model: nn.Module, **cfg) -> Adapter:
    torch.manual_seed(0)
    adapter = Adapter(model, AdapterConfig(**cfg))
    with torch.no_grad():
        for m in adapter.modules.values():
            m.lora_B.normal_(std=0.05)  # B = 0 at init would make every test trivial
    return adapter


def test_f1_output_is_exactly_x_times_w0_plus_s_gated_delta() -> None:
    torch.manual_seed(0)
    model = Toy()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = _trained_adapter(model, targets=["q_proj"], r=4, alpha=8)
    adapter.reinit_thresholds()
    adapter.set_f(1.0)
    m = adapter.modules["layers.0.q_proj"]
    x = torch.randn(5, 7, 48)
    theta = m.theta()
    j = signed_jump(m.lora_B @ m.lora_A, theta, m.bandwidth * theta)
    expected = F.linear(x, w0["layers.0.q_proj.weight"] + 2.0 * j, w0["layers.0.q_proj.bias"])
    assert torch.equal(m(x), expected)
    assert 0 < int((j != 0).sum()) < j.numel()  # the gate really dropped entries


@pytest.mark.parametrize("gate", ["jump", "none"])
def test_merge_then_unload_leaves_outputs_unchanged(gate: str) -> None:
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj", "v_proj"], gate=gate)
    adapter.reinit_thresholds()
    adapter.set_f(1.0)
    x = torch.randn(4, 48)
    with torch.no_grad():
        before = model(x)
    merged = adapter.merged_weights()
    adapter.commit(merged)
    assert not any(isinstance(m, type(adapter)) for m in model.modules())
    assert isinstance(model.layers[0].q_proj, nn.Linear)
    with torch.no_grad():
        after = model(x)
    if gate == "jump":
        assert torch.equal(before, after)
    else:  # the factored path x@A.T@B.T rounds differently from the merged matmul
        torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged["layers.0.q_proj.weight"], Toy().layers[0].q_proj.weight)


def test_non_finite_merge_raises_and_changes_nothing() -> None:
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj"])
    with torch.no_grad():
        adapter.modules["layers.1.q_proj"].lora_B[0, 0] = math.inf
    w_before = model.layers[1].q_proj.base.weight.clone()
    with pytest.raises(TrainerError, match="non-finite"):
        adapter.merged_weights()
    assert torch.equal(model.layers[1].q_proj.base.weight, w_before)


def test_targets_select_modules_by_name_and_per_block_groups() -> None:
    model = Toy(n_blocks=3)
    adapter = Adapter(model, AdapterConfig(targets=["q_proj", "up_proj"], granularity="per_block"))
    assert sorted(adapter.modules) == sorted(
        f"layers.{i}.{p}" for i in range(3) for p in ("q_proj", "up_proj")
    )
    assert adapter.thresholds.phi.numel() == 3
    assert adapter.modules["layers.2.up_proj"].group == 2
    with pytest.raises(TrainerError, match="no nn\\.Linear"):
        Adapter(Toy(), AdapterConfig(targets=["k_proj"]))


@pytest.mark.parametrize("granularity", ["global", "per_block"])
@pytest.mark.parametrize("gate", ["jump", "topk"])
def test_reinit_keeps_the_adapter_parameter_count(granularity: str, gate: str) -> None:
    model = Toy()
    adapter = _trained_adapter(
        model, targets=["q_proj", "v_proj", "up_proj"], granularity=granularity, gate=gate
    )
    adapter.reinit_thresholds()
    for group in range(adapter.thresholds.phi.numel()):
        members = [m for m in adapter.modules.values() if m.group == group]
        kept = sum(int((m.delta().abs() > m.theta()).sum()) for m in members)
        budget = sum(m.lora_A.numel() + m.lora_B.numel() for m in members)
        if gate == "topk":
            assert kept == budget  # theta is the order statistic itself
        else:  # theta = exp(phi) * RMS(dW): float rounding may move a boundary entry
            assert abs(kept - budget) <= 2


def test_order_threshold_counts_with_ties() -> None:
    # Ties away from the boundary: the count is exact.
    v = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    assert int((v > order_log_threshold(v, 3).exp()).sum()) == 3
    assert int((v > order_log_threshold(v, 5).exp()).sum()) == 5
    # A tie across the boundary cannot be split: every tied entry is dropped, never kept.
    assert int((v > order_log_threshold(v, 4).exp()).sum()) == 3
    # Values 2e-6 apart at the boundary still give the exact count (phi is nudged).
    close = torch.tensor([0.0123, 0.0123 * (1 + 2e-6), 0.5])
    assert int((close > order_log_threshold(close, 2).exp()).sum()) == 2
    # Closer than float32 log-theta can resolve: dropped like a tie, never kept extra.
    a = torch.tensor(0.0123)
    adjacent = torch.stack([a, torch.nextafter(a, torch.tensor(1.0)), torch.tensor(0.5)])
    assert int((adjacent > order_log_threshold(adjacent, 2).exp()).sum()) == 1
    # Degenerate budgets.
    assert int((v > order_log_threshold(v, 100).exp()).sum()) == 8
    assert int((v > order_log_threshold(v, 0).exp()).sum()) == 0


def test_schedule_is_dense_then_blended_then_sparse() -> None:
    s = SparsitySchedule(16)
    assert (s.t1, s.t2) == (3, 12)
    assert [s.f(t) for t in (0, 3)] == [0.0, 0.0]
    assert s.f(12) == 1.0 and s.f(15) == 1.0
    assert 0 < s.f(7) < 1
    # Short tasks: t1 >= 1, so the gate never switches on over the all-zero dW of step 0.
    assert SparsitySchedule(3).t1 == 1 and SparsitySchedule(3).f(0) == 0.0
    assert SparsitySchedule(2).f(1) == 1.0  # t2 <= t1: a hard switch at t1
    assert SparsitySchedule(1).f(0) == 0.0  # never reaches t1: initialised before the merge
    # Other fractions (adapter.sparse_schedule, an ablation): sparse from half way, or never.
    half = SparsitySchedule(16, 0.5, 0.5)
    assert (half.t1, half.t2, half.f(7), half.f(8)) == (8, 8, 0.0, 1.0)
    assert SparsitySchedule(16, 1.0, 1.0).t1 == 16  # never reached: cut before the merge


def test_topk_keeps_the_budget_every_step_and_learns_nothing() -> None:
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj"], gate="topk")
    budget = sum(m.lora_A.numel() + m.lora_B.numel() for m in adapter.modules.values())
    adapter.begin_step(0.0, reinit=True)
    for scale in (3.0, 0.5):
        with torch.no_grad():
            for m in adapter.modules.values():
                m.lora_B.mul_(scale)  # the update changes between steps
        adapter.begin_step(1.0)
        kept = sum(int((m.delta().abs() > m.theta()).sum()) for m in adapter.modules.values())
        assert kept == budget
        model(torch.randn(3, 48)).sum().backward()
        assert adapter.thresholds.phi.grad is None
        adapter.end_step()


@pytest.mark.parametrize("granularity", ["global", "per_block"])
def test_topk_at_a_chosen_density_keeps_that_fraction_every_step(granularity: str) -> None:
    model = Toy()
    adapter = _trained_adapter(
        model, targets=["q_proj", "v_proj"], gate="topk", topk_density=0.1,
        granularity=granularity,
    )  # fmt: skip
    adapter.begin_step(0.0, reinit=True)
    for scale in (1.0, 5.0):
        with torch.no_grad():
            for m in adapter.modules.values():
                m.lora_B.mul_(scale)
        adapter.begin_step(1.0)
        for group in range(adapter.thresholds.phi.numel()):
            members = [m for m in adapter.modules.values() if m.group == group]
            kept = sum(int((m.delta().abs() > m.theta()).sum()) for m in members)
            assert kept == round(0.1 * sum(m.delta().numel() for m in members))
        adapter.end_step()


def test_the_reference_threshold_is_absolute_with_an_absolute_bandwidth() -> None:
    """threshold_training: reference: theta = exp(phi) (no RMS scale), so an update that
    grows keeps more entries; the STE window is 1e-3 wide whatever theta is."""
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj", "v_proj"], threshold_training="reference")
    adapter.begin_step(0.0, reinit=True)
    budget = sum(m.lora_A.numel() + m.lora_B.numel() for m in adapter.modules.values())
    kept = sum(int((m.delta().abs() > m.theta()).sum()) for m in adapter.modules.values())
    assert kept == budget  # the order statistic itself, no scale to round through
    assert adapter.thresholds.scale.tolist() == [1.0]
    before = adapter.density()
    with torch.no_grad():
        for m in adapter.modules.values():
            m.lora_B.mul_(7.0)
    adapter.begin_step(1.0)
    assert adapter.thresholds.scale.tolist() == [1.0]
    assert adapter.density() > before + 0.3  # half the entries kept at the re-init
    m = next(iter(adapter.modules.values()))
    assert m._kernel_width(m.theta()) == 1e-3
    adapter.end_step()


def test_learned_threshold_follows_the_scale_of_the_update() -> None:
    """theta = exp(phi) * RMS(dW): an update that grows uniformly keeps its density."""
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj", "v_proj"])
    adapter.begin_step(0.0, reinit=True)
    before = adapter.density()
    with torch.no_grad():
        for m in adapter.modules.values():
            m.lora_B.mul_(7.0)
    adapter.begin_step(1.0)
    assert adapter.density() == pytest.approx(before, abs=1e-9)
    adapter.end_step()


def test_too_short_task_initialises_the_threshold_before_the_merge() -> None:
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj"])
    assert not bool(adapter.thresholds.ready)
    adapter.end_training()
    assert bool(adapter.thresholds.ready)
    assert 0.0 < adapter.density() < 1.0


def test_injects_into_hf_model_and_trains_theta(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = _trained_adapter(model, targets=targets)  # the default config
    assert len(adapter.modules) == 7 * model.config.num_hidden_layers
    adapter.begin_step(0.0, reinit=True)
    adapter.begin_step(0.5)
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert adapter.thresholds.phi.grad is not None and adapter.thresholds.phi.grad.abs().sum() > 0
    assert all(m.lora_A.grad is not None for m in adapter.modules.values())


def test_while_f_is_zero_the_dense_factored_path_runs_and_theta_gets_no_gradient() -> None:
    model = Toy()
    w0 = model.layers[0].q_proj.weight.detach().clone()
    adapter = _trained_adapter(model, targets=["q_proj"])
    m = adapter.modules["layers.0.q_proj"]
    x = torch.randn(5, 48)
    dense = F.linear(x, w0 + m.scaling * (m.lora_B @ m.lora_A).detach(), m.base.bias)
    out = m(x)  # f = 0
    torch.testing.assert_close(out, dense)
    out.sum().backward()
    assert adapter.thresholds.phi.grad is None
    assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0


def test_delta_and_gate_stay_fp32_under_bf16_autocast() -> None:
    model = Toy()
    adapter = _trained_adapter(model, targets=["q_proj"])
    adapter.reinit_thresholds()
    m = adapter.modules["layers.0.q_proj"]
    reference = m.gated_delta(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.delta().dtype == torch.float32
        assert torch.equal(m.gated_delta(1.0), reference)  # same mask as the merge sees
