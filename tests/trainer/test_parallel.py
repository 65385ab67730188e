"""Several processes (torchrun, gloo on CPU) against one at the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from transformers import AutoModelForCausalLM, AutoTokenizer

from jlserve.checkpoint import load_tensors
from tests.conftest import REPO_ROOT
from tests.helpers.cl_stream import ORDER, write_stream
from trainer.adapter import Adapter
from trainer.config import AdapterConfig
from trainer.data import IGNORE_INDEX, Encoder
from trainer.parallel import Examples, RankBatches, data_parallel, global_batches


def _rank_batches(n: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    batches = BatchSampler(RandomSampler(range(n), generator=generator), batch_size, False)
    return list(RankBatches(batches, world_size, rank))


def test_one_process_draws_the_same_batches_as_a_plain_shuffled_loader() -> None:
    examples = [([i], [i]) for i in range(17)]
    first = [p[0] for p, _ in examples]

    def ids(batch: list) -> list[int]:
        return [p[0] for p, _ in batch]

    plain_gen, ours_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = DataLoader(examples, batch_size=4, shuffle=True, generator=plain_gen, collate_fn=ids)
    ours = DataLoader(
        Examples(examples),
        batch_sampler=global_batches(17, 4, ours_gen),
        generator=ours_gen,
        collate_fn=ids,
    )
    for _epoch in range(2):  # the generator carries over epochs alike
        got = list(ours)
        assert got == list(plain)
        assert sorted(i for batch in got for i in batch) == first


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_out_each_global_batch(world_size: int) -> None:
    whole = _rank_batches(17, 4, 1, 0)
    shares = [_rank_batches(17, 4, world_size, r) for r in range(world_size)]
    assert all(len(s) == len(whole) for s in shares)  # every rank takes every step
    for step, batch in enumerate(whole):
        parts = [s[step] for s in shares]
        real = [i for part in parts for i in part if i >= 0]
        assert real == batch  # contiguous shares, in order
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    # The last global batch has one example: the other ranks get it without a target.
    assert [s[-1] for s in shares][1:] == [[~whole[-1][0]]] * (world_size - 1)


def test_an_example_without_target_adds_no_loss_tokens(tiny_model_dir) -> None:
    enc = Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), max_length=32)
    examples = Examples([([5, 6, 7], [8, enc.eos])])
    batch = enc.collate([examples[~0]])
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, enc.eos]
    assert batch["attention_mask"].sum() == 5
    assert batch["labels"].eq(IGNORE_INDEX).all()


# ------------------------------------------------------------------ the thresholds under DDP


def _global_batch() -> dict[str, torch.Tensor]:
    """Four sequences of different lengths and target-token counts, right-padded."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (length, prompt) in enumerate([(12, 4), (7, 5), (10, 2), (5, 4)]):
        mask[row, length:] = 0
        labels[row, length:] = IGNORE_INDEX
        labels[row, :prompt] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train_gated(model_dir: Path, batch: dict, forward) -> tuple[torch.Tensor, torch.Tensor]:
    """Three AdamW steps of a gated adapter (f = 1, theta re-initialised, phi at a high lr
    so that it moves); returns (phi, B of the first adapted layer)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    adapter = Adapter(model, AdapterConfig(gate="jump"))
    with torch.no_grad():
        for m in adapter.modules.values():
            m.lora_B.normal_(std=0.02)
    adapter.reinit_thresholds()
    adapter.set_f(1.0)
    step = forward(model, adapter)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(adapter.lora_parameters())},
            {"params": [adapter.thresholds.phi], "lr": 0.05},
        ],
        lr=1e-3,
        weight_decay=0.0,
    )
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        step(batch).backward()
        optimizer.step()
    first = next(iter(adapter.modules.values()))
    return adapter.thresholds.phi.detach().clone(), first.lora_B.detach().clone()


def _rank_worker(rank: int, world_size: int, store: str, model_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    share = {k: v[2 * rank : 2 * rank + 2] for k, v in _global_batch().items()}

    def ddp_step(model, adapter):
        wrapped = data_parallel(model, adapter, torch.device("cpu"))
        return lambda batch: wrapped(**batch).loss

    try:
        torch.save(_train_gated(model_dir, share, ddp_step), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _plain_step(model, adapter):
    return lambda batch: model(**batch).loss


def test_thresholds_stay_equal_across_ranks_and_equal_to_one_process(
    tmp_path, tiny_model_dir
) -> None:
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), tiny_model_dir, tmp_path), nprocs=2)
    (phi0, b0), (phi1, b1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert phi0.equal(phi1) and b0.equal(b1)
    phi, b = _train_gated(tiny_model_dir, _global_batch(), _plain_step)
    torch.testing.assert_close(phi0, phi, rtol=1e-5, atol=0)
    torch.testing.assert_close(b0, b, rtol=1e-4, atol=1e-7)
    # The control: rank 0's half alone moves phi more than 10x the tolerance away, so the
    # averaged gradient is what matched (measured: 7e-4).
    half = {k: v[:2] for k, v in _global_batch().items()}
    alone, _ = _train_gated(tiny_model_dir, half, _plain_step)
    assert (alone - phi).abs().max() > 10 * 1e-5 * phi.abs().max()


# ------------------------------------------------------------------ torchrun end to end


def _train(nproc: int, cfg: Path, out: Path, *extra: str, logs: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(nproc)]
        if logs is not None:
            launcher += ["--log-dir", str(logs), "--redirects", "3"]
    cmd = [*launcher, "-m", "trainer", "--config", str(cfg), "--out", str(out), *extra]
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_info(run: Path) -> tuple[dict, dict]:
    return json.loads((run / "run.json").read_text()), json.loads(
        (run / "metrics.json").read_text()
    )


def _rank_log(logs: Path, rank: int) -> str:
    (path,) = logs.glob(f"**/attempt_0/{rank}/stderr.log")
    return path.read_text()


@pytest.mark.slow  # six torchrun/python launches: ~2 min on 2 busy cores
def test_two_processes_train_like_one_and_only_rank_0_writes(tmp_path, tiny_model_dir) -> None:
    write_stream(tmp_path / "data")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{root: {tmp_path / 'data'}, order: {ORDER}, max_length: 64}}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
    )
    one, two, part = tmp_path / "one", tmp_path / "two", tmp_path / "part"
    _train(1, cfg, one)
    logs = tmp_path / "logs"
    _train(2, cfg, two, "--publish-dir", str(tmp_path / "published"), logs=logs)

    # Same global batches, same loss normalisation, thresholds averaged like the adapter:
    # equal up to float summation order. Tolerances, measured on this stream: losses and
    # thresholds to 1e-5 relative; merged bf16 weights to one rounding step (an entry
    # whose fp32 value sits at a bf16 rounding boundary, or at the gate's threshold, may
    # land on the other side), in at most 0.1 % of the adapted entries.
    (info1, metrics1), (info2, metrics2) = _run_info(one), _run_info(two)
    assert metrics2["accuracy"] == metrics1["accuracy"]
    for log1, log2 in zip(info1["task_log"], info2["task_log"], strict=True):
        assert log2["steps"] == log1["steps"]
        for key in ("final_loss", "theta", "gate_density"):
            assert log2[key] == pytest.approx(log1[key], rel=1e-5), key
        assert log2["delta_nnz"] == pytest.approx(log1["delta_nnz"], rel=1e-3)
    base = load_tensors(tiny_model_dir)
    merged1 = load_tensors(one / "merged" / info1["versions"][-1]["merged"])
    merged2 = load_tensors(two / "merged" / info2["versions"][-1]["merged"])
    adapted = [n for n in base if not base[n].equal(merged1[n])]
    assert adapted and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in adapted)
    off, total = 0, 0
    for name in adapted:
        a, b = merged1[name].float(), merged2[name].float()
        ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7  # one bf16 step (8 significant bits)
        off += int(((a - b).abs() > ulp).sum())
        total += a.numel()
    assert off <= 1e-3 * total, (off, total)
    assert all(merged1[n].equal(merged2[n]) for n in base if n not in adapted)

    # Rank 0 alone writes and publishes: one delta per task, the run's own bytes; rank 1
    # prints neither a task summary nor a publish note.
    deltas = sorted(p.name for p in (two / "deltas").iterdir())
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == deltas
    for name in deltas:
        assert (tmp_path / "published" / name).read_bytes() == (two / "deltas" / name).read_bytes()
    assert "wrote" in _rank_log(logs, 0) and "task 2/2" in _rank_log(logs, 0)
    assert "wrote" not in _rank_log(logs, 1) and "task 1/2" not in _rank_log(logs, 1)

    # Resume under torchrun continues exactly where the uninterrupted run went.
    _train(2, cfg, part, "--stop-after", "1")
    _train(2, cfg, part, "--resume")
    (info3, metrics3) = _run_info(part)
    assert [v["fingerprint"] for v in info3["versions"]] == [
        v["fingerprint"] for v in info2["versions"]
    ]
    assert metrics3["accuracy"] == metrics2["accuracy"]
    assert metrics3["density"] == metrics2["density"]

    # Tasks arrive under torchrun too: a one-task run plus the second task appended is the
    # two-task run, version for version.
    first = tmp_path / "first.yaml"
    first.write_text(cfg.read_text().replace(f"order: {ORDER}", "tasks: [colors]"))
    grown = tmp_path / "grown"
    _train(2, first, grown)
    _train(2, first, grown, "--add-task", f"moods={tmp_path / 'data' / 'moods'}")
    info4, metrics4 = _run_info(grown)
    assert [v["fingerprint"] for v in info4["versions"]] == [
        v["fingerprint"] for v in info2["versions"]
    ]
    assert metrics4["accuracy"]["matrix"] == metrics2["accuracy"]["matrix"]
