"""diff / plan_update: exact, lineage-checked, reversible, non-mutating."""

from __future__ import annotations

import pytest
import torch

from jlserve.checkpoint import TensorDigests, fingerprint, load_tensors
from jlserve.delta import diff_tensors, parse_delta, plan_chain, plan_update
from jlserve.errors import DeltaMismatchError


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_tensors(tiny_model_dir)


def perturbed(tensors, seed: int, density: float = 0.02):
    """A 'task update': a sparse random change to every 2-D weight."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name, t in tensors.items():
        if t.dim() == 2:
            mask = torch.rand(t.shape, generator=gen) < density
            out[name] = torch.where(mask, t + torch.randn(t.shape, generator=gen).to(t.dtype), t)
    return out


@pytest.mark.parametrize("formats", [(2, 2, 2), (1, 2, 1), (2, 1, 2)])
def test_chain_of_deltas_reproduces_every_checkpoint_bit_for_bit(base, formats):
    """Through the files: v1 and v2 deltas mixed in one chain, applied then reverted."""
    versions = [base]
    for seed in range(3):
        versions.append(perturbed(versions[-1], seed))
    deltas = [
        parse_delta(
            diff_tensors(versions[k], versions[k + 1], task=f"t{k + 1}", version=k + 1).to_bytes(
                formats[k]
            )
        )
        for k in range(3)
    ]
    assert [d.metadata.format_version for d in deltas] == list(formats)
    model, digests = dict(base), TensorDigests(base)
    for k, delta in enumerate(deltas, start=1):
        planned = plan_update(model, digests, delta)
        model, digests = {**model, **planned.changed}, planned.digests
        assert planned.fingerprint == fingerprint(versions[k]) == delta.metadata.child_fingerprint
        assert all(torch.equal(model[n], versions[k][n]) for n in base)
    for k in range(3, 0, -1):  # and back down to the base
        planned = plan_update(model, digests, deltas[k - 1], reverse=True)
        model, digests = {**model, **planned.changed}, planned.digests
        assert all(torch.equal(model[n], versions[k - 1][n]) for n in base)


def test_diff_is_exact_at_bit_level():
    base = {"w": torch.tensor([0.0, 1.0, 2.0, -3.0], dtype=torch.bfloat16)}
    target = {"w": torch.tensor([-0.0, 1.0, 2.015625, -3.0], dtype=torch.bfloat16)}
    delta = diff_tensors(base, target, task="t", version=1)
    assert delta.changes["w"].index.tolist() == [0, 2]  # -0.0 differs from 0.0 in bits


def test_identical_checkpoints_give_an_empty_delta(base):
    delta = diff_tensors(base, base, task="noop", version=1)
    assert delta.nnz == 0
    assert delta.metadata.parent_fingerprint == delta.metadata.child_fingerprint


def test_diff_refuses_mismatched_checkpoints(base):
    other = dict(base)
    name = next(iter(other))
    other[name] = other[name].float()
    with pytest.raises(DeltaMismatchError, match="base is bfloat16"):
        diff_tensors(base, other, task="t", version=1)
    with pytest.raises(DeltaMismatchError, match="different parameters"):
        diff_tensors(base, {k: v for k, v in base.items() if k != name}, task="t", version=1)


def test_lineage_error_names_both_fingerprints(base):
    v1 = perturbed(base, 1)
    delta = diff_tensors(v1, perturbed(v1, 2), task="t2", version=2)
    with pytest.raises(DeltaMismatchError) as info:
        plan_update(base, TensorDigests(base), delta, source="t2.safetensors")
    assert fingerprint(base) in str(info.value)
    assert delta.metadata.parent_fingerprint in str(info.value)


@pytest.mark.parametrize("format_version", [1, 2])
def test_reverting_requires_the_child(base, format_version):
    delta = diff_tensors(base, perturbed(base, 3), task="t", version=1)
    delta = parse_delta(delta.to_bytes(format_version))
    with pytest.raises(DeltaMismatchError, match="child"):
        plan_update(base, TensorDigests(base), delta, reverse=True)


def test_a_v2_delta_on_a_look_alike_parent_is_refused(base):
    """Without parent values in the file, the fingerprints catch an XOR applied to the
    wrong parent, even when its lineage claim is forged to name the model."""
    other = perturbed(base, 4)
    delta = parse_delta(diff_tensors(other, perturbed(other, 5), task="t", version=1).to_bytes())
    forged = type(delta)(
        metadata=delta.metadata.model_copy(update={"parent_fingerprint": fingerprint(base)}),
        changes=delta.changes,
    )
    snapshot = {k: v.clone() for k, v in base.items()}
    with pytest.raises(DeltaMismatchError, match="does not match the delta's declared child"):
        plan_update(base, TensorDigests(base), forged)
    assert all(snapshot[k].equal(base[k]) for k in base)


def test_a_chain_is_planned_as_one_update_equal_to_step_by_step(base):
    deltas, models = [], [base]
    for k in range(3):
        target = dict(models[-1])
        name = sorted(base)[k % 2]
        flat = target[name].reshape(-1).clone()
        flat[k::5] += 1.0
        target[name] = flat.view(base[name].shape)
        deltas.append((diff_tensors(models[-1], target, task=f"t{k}"), f"t{k}"))
        models.append(target)
    chained = plan_chain(base, TensorDigests(base), deltas)
    assert chained.fingerprint == TensorDigests(models[-1]).fingerprint
    for name, t in chained.changed.items():
        assert torch.equal(t, models[-1][name])
        changed_anywhere = (base[name] != models[-1][name]).reshape(-1).nonzero().squeeze(1)
        assert set(changed_anywhere.tolist()) <= set(chained.positions[name].tolist())
    back = plan_chain(models[-1], chained.digests, list(reversed(deltas)), reverse=True)
    assert back.fingerprint == TensorDigests(base).fingerprint


def test_a_chain_out_of_order_is_refused_naming_the_delta(base):
    first = dict(base)
    name = sorted(base)[0]
    first[name] = base[name] + 1.0
    second = dict(first)
    second[name] = first[name] * 2.0
    d1 = diff_tensors(base, first, task="one")
    d2 = diff_tensors(first, second, task="two")
    d2_again = diff_tensors(first, second, task="two")
    with pytest.raises(DeltaMismatchError, match=r"b\.safetensors: .* does not continue"):
        plan_chain(
            base,
            TensorDigests(base),
            [(d1, "a.safetensors"), (d2, "x"), (d2_again, "b.safetensors")],
        )
