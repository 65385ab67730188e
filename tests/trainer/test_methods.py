"""CL method plug-ins: ELLA penalty, O-LoRA loss, SeqLoRA's kept adapter."""

import pytest
import torch
from torch import nn

from trainer.config import RunConfig
from trainer.errors import TrainerError
from trainer.methods import Ella, OLora, SeqLoRA, build_method


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
    ella = Ella(_cfg("ella", gate="jump"))
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
    olora = OLora(_cfg("olora"))
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
    seq = SeqLoRA(_cfg("seqLoRA"))
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
@pytest.mark.parametrize("name", ["incLoRA", "seqLoRA", "ella", "olora"])
def test_every_method_composes_with_every_gate_over_two_tasks(name: str, gate: str) -> None:
    torch.manual_seed(0)
    model = Toy()
    method = build_method(_cfg(name, gate=gate), n_tasks=2)
    for task in range(2):
        adapter = method.start_task(model, task)
        assert all(m.gated == (gate != "none") for m in adapter.modules.values())
        _randomize(adapter)
        adapter.begin_step(0.5, reinit=True)
        adapter.begin_step(0.5)
        extras = method.extra_loss(adapter, 0.5)
        loss = model(torch.randn(3, 6)).square().mean() + sum(extras.values())
        loss.backward()
        assert torch.isfinite(loss)
        assert all(m.lora_A.grad is not None for m in adapter.modules.values())
        assert (adapter.thresholds.phi.grad is not None) == (gate == "jump")  # topk: not learned
        adapter.end_step()
        adapter.end_training()
        method.end_task(adapter, adapter.merged_weights())


def test_ella_lambda_list_must_match_the_stream() -> None:
    with pytest.raises(TrainerError, match="3 tasks"):
        build_method(_cfg("ella"), n_tasks=3)  # _cfg gives two values
