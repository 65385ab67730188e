"""CL method plug-ins: ELLA penalty, O-LoRA loss, SeqLoRA's kept adapter."""

import pytest
import torch
from torch import nn

from trainer.config import RunConfig
from trainer.errors import TrainerError
from trainer.methods import Ella, InfLoRA, OLora, SeqLoRA, build_method


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 4, bias=False)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1].q_proj(self.layers[0].q_proj(x) @ torch.ones(4, 6))


def _cfg(name: str, **adapter) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": "unused",
            "method": {"name": name, "ella_lambda": [1.0, 10.0]},
            "adapter": {"targets": ["q_proj"], "r": 2, "alpha": 4, **adapter},
        }
    )


def _randomize(adapter) -> None:
    with torch.no_grad():
        for m in adapter.modules.values():
            m.lora_B.normal_()


def test_ella_penalty_is_zero_on_task_one_and_matches_hand_computation_on_task_two() -> None:
    torch.manual_seed(0)
    model = Toy()
    ella = Ella(_cfg("ella", gate="jump"), n_tasks=2)
    first = ella.start_task(model, 0)
    _randomize(first)
    assert ella.extra_loss(first, 1.0)["ella"].item() == 0.0
    first.reinit_thresholds()
    w_past = {n: (m.scaling * m.gated_delta(1.0)).detach() for n, m in first.modules.items()}
    ella.end_task(first, first.merged_weights())
    second = ella.start_task(model, 1)
    _randomize(second)
    second.reinit_thresholds()
    f = 0.25
    by_hand = []
    for name, m in second.modules.items():
        dw = (m.lora_B @ m.lora_A).detach()
        gated = dw * (dw.abs() > m.theta().detach())
        dw_hat = 2.0 * (f * gated + (1 - f) * dw)  # s = alpha / r = 2
        by_hand.append(((dw_hat * w_past[name]) ** 2).sum())
    expected = 10.0 * torch.stack(by_hand).mean()  # lambda of task 2
    penalty = ella.extra_loss(second, f)["ella"]
    torch.testing.assert_close(penalty, expected)
    assert penalty > 0
    penalty.backward()
    assert second.thresholds.phi.grad is None  # ELLA sends no gradient to theta
    assert all(m.lora_B.grad.abs().sum() > 0 for m in second.modules.values())


def test_olora_loss_is_zero_for_orthogonal_a_and_positive_otherwise() -> None:
    model = Toy()
    olora = OLora(_cfg("olora"), n_tasks=2)
    first = olora.start_task(model, 0)
    eye = torch.eye(6)
    with torch.no_grad():
        for m in first.modules.values():
            m.lora_A.copy_(eye[:2])
    assert olora.extra_loss(first, 0.0)["olora"].item() == 0.0
    olora.end_task(first, first.merged_weights())
    second = olora.start_task(model, 1)
    with torch.no_grad():
        for m in second.modules.values():
            m.lora_A.copy_(eye[2:4])  # orthogonal to task 1's rows
    assert olora.extra_loss(second, 0.0)["olora"].item() == 0.0
    with torch.no_grad():
        second.modules["layers.0.q_proj"].lora_A[0, 0] = 3.0
    # sum |A_past @ A_new.T| = |1 * 3| = 3, times lambda 0.5
    assert olora.extra_loss(second, 0.0)["olora"].item() == 1.5


def test_seqlora_keeps_one_adapter_and_serving_view_restores_it() -> None:
    torch.manual_seed(0)
    model = Toy()
    seq = SeqLoRA(_cfg("seqLoRA"), n_tasks=2)
    adapter = seq.start_task(model, 0)
    _randomize(adapter)
    adapter.reinit_thresholds()
    base = {n: m.base.weight.clone() for n, m in adapter.modules.items()}
    merged = adapter.merged_weights()
    kept = seq.end_task(adapter, merged)
    assert kept is adapter
    x = torch.randn(3, 6)
    with seq.eval_view(kept, merged):
        assert isinstance(model.layers[0].q_proj, nn.Linear)
        served = model(x)
    adapter.set_f(1.0)
    assert torch.equal(model(x), served)  # adapter at f=1 == the merged weights
    assert all(torch.equal(m.base.weight, base[n]) for n, m in adapter.modules.items())
    assert bool(adapter.thresholds.ready)
    again = seq.start_task(model, 1)  # a fresh threshold for the next task
    assert again is adapter and again.thresholds.phi[0].item() == 0.0
    assert not bool(again.thresholds.ready)


@pytest.mark.parametrize("gate", ["jump", "topk", "none"])
@pytest.mark.parametrize("name", ["incLoRA", "seqLoRA", "ella", "olora", "inflora"])
def test_every_method_composes_with_every_gate_over_two_tasks(name: str, gate: str) -> None:
    torch.manual_seed(0)
    model = Toy()
    method = build_method(_cfg(name, gate=gate), n_tasks=2)
    for task in range(2):
        adapter = method.start_task(model, task)
        assert all(m.gated == (gate != "none") for m in adapter.modules.values())
        method.prepare_task(adapter, lambda: model(torch.randn(8, 6)))
        _randomize(adapter)
        adapter.begin_step(0.5, reinit=True)
        adapter.begin_step(0.5)
        extras = method.extra_loss(adapter, 0.5)
        loss = model(torch.randn(3, 6)).square().mean() + sum(extras.values())
        loss.backward()
        assert torch.isfinite(loss)
        trains_a = name != "inflora"  # InfLoRA's A is designed and frozen
        assert all((m.lora_A.grad is not None) == trains_a for m in adapter.modules.values())
        assert all(m.lora_B.grad is not None for m in adapter.modules.values())
        assert (adapter.thresholds.phi.grad is not None) == (gate == "jump")  # topk: not learned
        adapter.end_step()
        adapter.end_training()
        method.end_task(adapter, adapter.merged_weights())


def _fit_b(model: nn.Module, adapter, x: torch.Tensor, steps: int = 30) -> None:
    """A few Adam steps of the trainable adapter parameters towards a random target."""
    target = torch.randn(x.shape[0], 4)
    trainable = [p for p in adapter.lora_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(x) - target).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["inflora", "incLoRA"])
def test_inflora_update_is_orthogonal_to_the_earlier_tasks_input_subspace(name: str) -> None:
    """Task 1's inputs span e0, e1; task 2's also use e2, e3. InfLoRA's task-2 update
    vanishes on the stored subspace, so the outputs on task 1's inputs do not change
    (IncLoRA, the control, changes them)."""
    torch.manual_seed(0)
    model = Toy()
    method = build_method(_cfg(name, gate="none"), n_tasks=2)
    x1 = torch.cat([torch.randn(64, 2), torch.zeros(64, 4)], dim=1)
    x2 = torch.cat([torch.randn(64, 4), torch.zeros(64, 2)], dim=1)
    for task, x in enumerate([x1, x2]):
        adapter = method.start_task(model, task)
        method.prepare_task(adapter, lambda x=x: model(x))
        first = adapter.modules["layers.0.q_proj"]
        if name == "inflora":
            assert not first.lora_A.requires_grad
            memory = method.past.get("layers.0.q_proj")
        w0 = first.base.weight.detach().clone()
        _fit_b(model, adapter, x)
        merged = adapter.merged_weights()
        update = merged["layers.0.q_proj.weight"] - w0  # s * B @ A, as committed
        assert update.abs().max() > 0.05  # the task was learned
        method.end_task(adapter, merged)
        if task == 0:
            before = model(x1).detach()  # task 1's outputs, before task 2
    after = model(x1).detach()
    if name == "incLoRA":
        assert (after - before).abs().max() > 0.01
        return
    assert memory.shape == (6, 2)  # e0 and e1, from task 1
    e01 = torch.eye(6, dtype=memory.dtype)[:, :2]
    torch.testing.assert_close(memory @ memory.T @ e01, e01)
    assert (update.double() @ memory).abs().max() < 1e-6  # dW_2 @ U_past = 0
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert method.past["layers.0.q_proj"].shape[1] == 4  # task 2 added e2, e3


def test_inflora_state_round_trips_for_resume() -> None:
    torch.manual_seed(0)
    model = Toy()
    method = InfLoRA(_cfg("inflora"), n_tasks=2)
    adapter = method.start_task(model, 0)
    method.prepare_task(adapter, lambda: model(torch.randn(16, 6)))
    method.end_task(adapter, adapter.merged_weights())
    state = method.state_dict()
    assert sorted(state) == ["layers.0.q_proj.input_basis", "layers.1.q_proj.input_basis"]
    again = InfLoRA(_cfg("inflora"), n_tasks=2)
    again.load_state_dict(state, model)
    assert all(torch.equal(again.past[n], t) for n, t in method.past.items())


def test_ella_lambda_list_must_match_the_stream() -> None:
    with pytest.raises(TrainerError, match="3 tasks"):
        build_method(_cfg("ella"), n_tasks=3)  # _cfg gives two values
