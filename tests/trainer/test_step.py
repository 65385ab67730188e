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
from trainer.data import IGNORE_INDEX, Encoder, Task
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


def _gated_model(model_dir) -> tuple[torch.nn.Module, Adapter]:
    """The tiny model in train mode with a gated adapter whose dW is not zero (f = 1)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    model.train()
    adapter = Adapter(model, AdapterConfig(r=4, alpha=8, gate="jump"))
    with torch.no_grad():  # B = 0 at init: give dW something to differentiate
        for module in adapter.modules.values():
            module.lora_B.normal_(std=0.02)
    adapter.reinit_thresholds()
    adapter.set_f(1.0)
    return model, adapter


def _collated_batch(model_dir) -> dict[str, torch.Tensor]:
    """Eight rows of very different lengths, right-padded by the trainer's collate."""
    enc = Encoder(AutoTokenizer.from_pretrained(model_dir), max_length=96)
    rows = [
        {"sentence": "word " * n, "label": label}
        for n, label in zip([1, 40, 3, 55, 2, 30, 4, 60], ["Good", "Bad"] * 4, strict=True)
    ]
    task = Task(name="t", instruction="Pick one.", options=["Good", "Bad"], train=rows, dev=[])
    return enc.collate(enc.train_examples(task))  # (8, L)


def _hand_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Eight right-padded rows of 5-40 tokens, random ids; labels on every real token of
    the even rows (column 0 too, which the causal shift drops) and on the odd rows' last
    three."""
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 40, 7, 33, 6, 38, 9, 12]
    ids = torch.randint(3, vocab, (8, 40), generator=gen)
    mask = (torch.arange(40) < torch.tensor(lengths)[:, None]).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, n in enumerate(lengths):
        start = 0 if row % 2 == 0 else n - 3
        labels[row, start:n] = ids[row, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("batch_of", ["collate", "hand"])
def test_grouped_loss_is_the_padded_batch_loss(tiny_model_dir, batch_of: str) -> None:
    """The grouped loss and the adapter's gradients equal one padded forward's (float
    summation order aside); the groups really cut the batch and each runs at its own
    width (else equality would prove nothing)."""
    model, adapter = _gated_model(tiny_model_dir)
    if batch_of == "collate":
        batch = _collated_batch(tiny_model_dir)
    else:
        batch = _hand_batch(model.config.vocab_size)
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = length_groups(lengths)
    assert len(groups) == 2 and max(lengths) > 1.5 * min(lengths)
    widths: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )

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
    assert widths == [max(lengths)]
    widths.clear()
    grouped, grouped_grads = loss_and_grads(lambda: grouped_loss(model, batch))
    assert widths == [max(lengths[i] for i in g) for g in groups] and widths[0] < max(lengths)
    assert grouped == pytest.approx(padded, rel=1e-5)
    for g, p in zip(grouped_grads, padded_grads, strict=True):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-7)
    assert any(p.abs().max() > 0 for p in padded_grads)


def test_grouped_loss_refuses_a_left_padded_batch(tiny_model_dir) -> None:
    """Cut to its length, a left-padded row would lose its real tokens: refused."""
    model, _ = _gated_model(tiny_model_dir)
    batch = _hand_batch(model.config.vocab_size)
    left = {key: value.flip(1) for key, value in batch.items()}  # the padding first
    with pytest.raises(ValueError, match="right-padded"):
        grouped_loss(model, left)
