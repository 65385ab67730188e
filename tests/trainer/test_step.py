"""The task loss in groups of like length (`trainer.step.grouped_loss`): the cut points are
the fewest padded tokens, and the grouped loss is the padded batch's, value and gradient."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.adapter import Adapter
from trainer.config import AdapterConfig
from trainer.data import Encoder, Task
from trainer.step import grouped_loss, length_groups


def _padded_tokens(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def _fewest_padded_tokens(lengths: list[int], min_rows: int) -> int:
    """Brute force: the sorted rows whole, or cut into consecutive groups of >= min_rows."""
    ordered = sorted(lengths)
    n, best = len(ordered), None
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            sizes = [b - a for a, b in itertools.pairwise(bounds)]
            if cuts and min(sizes) < min_rows:
                continue
            tokens = sum((b - a) * ordered[b - 1] for a, b in itertools.pairwise(bounds))
            best = tokens if best is None else min(best, tokens)
    return best


def test_length_groups_by_hand() -> None:
    # Four short rows and four long ones, interleaved: two groups, each in length order.
    assert length_groups([5, 100, 6, 101, 7, 102, 8, 103]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # Equal lengths save nothing by cutting: one group. Too few rows for two groups: one.
    assert length_groups([9] * 8) == [list(range(8))]
    assert length_groups([5, 100, 6, 101, 7, 102, 8]) == [[0, 2, 4, 6, 1, 3, 5]]
    assert length_groups([]) == []


@pytest.mark.parametrize("min_rows", [1, 2, 4])
def test_length_groups_are_the_fewest_padded_tokens(min_rows: int) -> None:
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 11))]
        groups = length_groups(lengths, min_rows)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        if len(lengths) >= 2 * min_rows:
            assert min(len(g) for g in groups) >= min_rows
        assert _padded_tokens(lengths, groups) == _fewest_padded_tokens(lengths, min_rows)


def test_grouped_loss_is_the_padded_batch_loss(tiny_model_dir) -> None:
    """Eight rows of very different lengths, right-padded by the trainer's collate: the
    grouped loss and the adapter's gradients equal one padded forward's (float summation
    order aside), and the groups really cut the batch (else the test would prove nothing)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    adapter = Adapter(model, AdapterConfig(r=4, alpha=8, gate="jump"))
    with torch.no_grad():  # B = 0 at init: give dW something to differentiate
        for module in adapter.modules.values():
            module.lora_B.normal_(std=0.02)
    adapter.reinit_thresholds()
    adapter.set_f(1.0)
    enc = Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), max_length=96)
    rows = [
        {"sentence": "word " * n, "label": label}
        for n, label in zip([1, 40, 3, 55, 2, 30, 4, 60], ["Good", "Bad"] * 4, strict=True)
    ]
    task = Task(name="t", instruction="Pick one.", options=["Good", "Bad"], train=rows, dev=[])
    batch = enc.collate(enc.train_examples(task))  # (8, L), right-padded
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(length_groups(lengths)) == 2 and max(lengths) > 1.5 * min(lengths)

    def loss_and_grads(loss_fn) -> tuple[float, list[torch.Tensor]]:
        adapter.begin_step(1.0)
        try:
            loss = loss_fn()
            loss.backward()
        finally:
            adapter.end_step()
        params = [*adapter.lora_parameters(), adapter.thresholds.phi]
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return loss.item(), grads

    padded, padded_grads = loss_and_grads(lambda: model(**batch).loss)
    grouped, grouped_grads = loss_and_grads(lambda: grouped_loss(model, batch))
    assert grouped == pytest.approx(padded, rel=1e-5)
    for g, p in zip(grouped_grads, padded_grads, strict=True):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-7)
    assert any(p.abs().max() > 0 for p in padded_grads)
