"""What each task's merge does to the earlier tasks, gated against dense (issue 24, point 4).

    .venv/bin/python -m bench.interference --seed 1                  # short_order_1, 16 steps/task
    .venv/bin/python -m bench.interference --seed 1 --variants incLoRA incLoRA+jump \\
        --tag so1-seed1-l0-5 --set adapter.l0_weight=5               # one setting changed

Per variant the stream is trained by `python -m trainer` (bench.cl_quality.run_variant,
greedy generation skipped: one dev row per task), then measured on the versions it
exported (rebuilt from the base and its deltas):

  loss     the held-out loss (teacher forcing, --loss-rows rows of each task's dev.json;
           the trained rows come from train.json) of every task on every version from the
           base on: per merge, how far each earlier task's loss moves; per task, its
           forgetting in loss (last version minus right after its own task).
  updates  per task, what its merge changed (new minus previous weights in the
           checkpoint's dtype, exactly the exported delta: a dense update's support is the
           entries that survive bf16 rounding): density, norm, mean |entry| on its support,
           how much of its support and of its squared norm lands on coordinates an earlier
           task changed (against the share a random support of that size would put there),
           how many of its largest entries sit among the largest of the earlier tasks'
           summed update, its cosine with that sum, its share of energy in the top r
           singular directions and in its heaviest input columns; also per block.

Why these: the gated update keeps a few per cent of B @ A, so if the task is learnt as
well as with the dense update, the kept entries must carry more each (norm concentrated),
and if every task keeps its largest-gradient coordinates they may be the same ones
(overlap above chance); either would make a sparse merge hit the earlier tasks harder
than a dense one. A gated update is also no longer low rank, so it acts on input
directions the task's LoRA never used.

Resumable per variant: bench/results/interference/<tag>/<variant>.json is kept (not run
again unless --force); a stopped training run resumes from its last task. The summary
bench/results/interference_<tag>.json and .md hold every finished variant of the tag.

--measure-only trains nothing and measures the finished runs of another benchmark as they
are, e.g. the forgetting regime's (the same runs whose accuracy BWT is reported):

    .venv/bin/python -m bench.interference --measure-only --runs runs/bench/cl_quality \
        --tag so1-x4-seed1 --variants incLoRA seqLoRA

--merge-scales 0.5 0.75 adds the merge-scale ablation to a variant's row (kept rows too,
nothing else measured again): each merge after the first applied at those fractions of its
update on the previous version, with its own task's held-out loss and the earlier tasks'
rise, against the run as exported (scale 1, from the loss matrix).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.cl_quality import MATCHED_DENSITY, VARIANTS, run_variant, settings_difference
from bench.common import (
    RESULTS,
    RUNS_ROOT,
    machine_info,
    rows_machine_lines,
    write_summary_files,
)
from jlserve.checkpoint import TensorDigests, load_tensors
from jlserve.delta import plan_update, read_delta
from jlserve.errors import JlserveError
from trainer.adapter import block_index
from trainer.config import default_data_root

REPO = Path(__file__).resolve().parents[1]
RUNS = RUNS_ROOT / "interference"
TOP_SHARE = 0.005  # "largest entries": the top 0.5 % of a task's |update| over adapted entries
COLUMN_SHARE = 0.02  # "heaviest input columns": the top 2 % of a matrix's columns by norm


# ---------------------------------------------------------------------------- updates


def block_of(name: str) -> str:
    """'model.layers.7.self_attn.q_proj.weight' -> 'layer 7' (q and v of a block together)."""
    index = block_index(name)
    return name if index is None else f"layer {index}"


def _top_mask(values: torch.Tensor, share: float) -> torch.Tensor:
    """Mask of the round(share * n) largest entries of a flat tensor (n,) of magnitudes,
    never a zero one (a sparse update has fewer non-zero entries than that at times)."""
    k = min(max(1, round(share * values.numel())), int((values > 0).sum()))
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k:
        mask[torch.topk(values, k, sorted=False).indices] = True
    return mask


def _summary(update: torch.Tensor, earlier: torch.Tensor, seen: torch.Tensor) -> dict[str, float]:
    """Statistics of one task's flat update (n,) against the earlier tasks' summed update
    (n,) and the mask of coordinates they changed (n,)."""
    support = update != 0
    nnz = int(support.sum())
    sq = update.square()
    total_sq = float(sq.sum())
    on_seen = support & seen
    out = {
        "density": nnz / update.numel(),
        "norm": total_sq**0.5,
        "mean_abs_on_support": float(update.abs().sum()) / max(nnz, 1),
        "max_abs": float(update.abs().max()),
        "support_on_earlier": int(on_seen.sum()) / max(nnz, 1),
        "energy_on_earlier": float(sq[on_seen].sum()) / total_sq if total_sq else 0.0,
    }
    earlier_norm = float(earlier.norm())
    if earlier_norm > 0 and total_sq > 0:
        out["cos_with_earlier"] = float(update @ earlier) / (total_sq**0.5 * earlier_norm)
        top, top_earlier = _top_mask(update.abs(), TOP_SHARE), _top_mask(earlier.abs(), TOP_SHARE)
        out["top_on_earlier_top"] = int((top & top_earlier).sum()) / int(top.sum())
    return out


def _matrix_sums(
    update: torch.Tensor, earlier: torch.Tensor, earlier_changed: torch.Tensor, rank: int
) -> dict[str, float]:
    """Sums over one matrix's update (d_out, d_in), to be added over a group of matrices:
    its squared norm (total), the part in its top `rank` singular directions (low_rank),
    the part in its heaviest input columns (top_columns: the COLUMN_SHARE of columns with
    the largest squared norm) and how many of those columns are also among the earlier
    tasks' summed update's heaviest (shared, of heavy; both 0 before any earlier task);
    `earlier_changed` (d_out, d_in) marks the coordinates an earlier task changed."""
    sigma = torch.linalg.svdvals(update)
    columns = update.square().sum(0)  # (d_in,)
    heavy = _top_mask(columns, COLUMN_SHARE)
    nnz = int((update != 0).sum())
    sums = {
        "nnz": float(nnz),
        # a support of this size drawn at random in this matrix would hit this many
        # coordinates an earlier task changed
        "chance_hits": nnz * float((earlier_changed).float().mean()),
        "total": float(columns.sum()),
        "low_rank": float(sigma[:rank].square().sum()),
        "top_columns": float(columns[heavy].sum()),
        "heavy": 0.0,
        "shared": 0.0,
    }
    if bool(earlier.any()) and sums["total"] > 0:
        sums["heavy"] = float(heavy.sum())
        sums["shared"] = float((heavy & _top_mask(earlier.square().sum(0), COLUMN_SHARE)).sum())
    return sums


def _group_stats(
    names: list[str],
    update: dict[str, torch.Tensor],
    earlier: dict[str, torch.Tensor],
    seen: dict[str, torch.Tensor],
    sums: dict[str, dict[str, float]],
) -> dict[str, float]:
    """`_summary` over the weights `names` taken together, and the ratios of their
    `_matrix_sums`: support_on_earlier_chance (the share a random support of each matrix's
    size would put on earlier coordinates, matrix by matrix: the gate's density differs by
    block), low_rank_energy (1 for a merged rank-r LoRA update up to rounding; a
    gated one is no longer low rank, what the gate cut acts on every input direction),
    column_concentration (share of the squared norm in the heaviest input columns) and
    heavy_columns_on_earlier (share of those columns that are the earlier tasks' heaviest
    too; chance is COLUMN_SHARE)."""
    out = _summary(*(torch.cat([d[n] for n in names]) for d in (update, earlier, seen)))
    total = {k: sum(sums[n][k] for n in names) for k in sums[names[0]]}
    out["support_on_earlier_chance"] = total["chance_hits"] / total["nnz"] if total["nnz"] else 0.0
    out["low_rank_energy"] = total["low_rank"] / total["total"] if total["total"] else 1.0
    out["column_concentration"] = total["top_columns"] / total["total"] if total["total"] else 0.0
    if total["heavy"]:
        out["heavy_columns_on_earlier"] = total["shared"] / total["heavy"]
    return out


def output_change(
    before: dict[str, torch.Tensor],
    update: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
) -> float:
    """How far an update moves the adapted layers' outputs on some inputs, relative to the
    outputs: sum_n ||X_n dW_n^T||^2 / sum_n ||X_n W_n^T||^2 over the weights n, with W_n
    (d_out, d_in) the weights before the update, dW_n its update (flat) and X_n (tokens,
    d_in) the inputs weight n sees."""
    moved = total = 0.0
    for n, x in inputs.items():
        weight = before[n].float()
        moved += float((x @ update[n].reshape(weight.shape).T).square().sum())
        total += float((x @ weight.T).square().sum())
    return moved / total


def update_stats(
    versions: list[dict[str, torch.Tensor]],
    names: list[str],
    rank: int,
    inputs: list[dict[str, torch.Tensor]] | None = None,
) -> list[dict]:
    """Per task t (versions[t] -> versions[t + 1]) the statistics of its update over every
    adapted weight in `names`, and per block (`_group_stats`). `versions` are state dicts,
    version 0 first. With `inputs` (per task, weight name -> (tokens, d_in) inputs of that
    weight on the task's held-out rows) also the update's `output_change` on its own task's
    inputs and, mean over them, on the earlier tasks' (a dense LoRA update is learnt along
    its task's input directions; what an update does on other tasks' inputs is what
    interferes with them)."""
    per_task = []
    earlier = {n: torch.zeros(versions[0][n].numel()) for n in names}  # summed update (n,)
    seen = {n: torch.zeros(versions[0][n].numel(), dtype=torch.bool) for n in names}
    blocks: dict[str, list[str]] = {}
    for n in names:
        blocks.setdefault(block_of(n), []).append(n)
    for before, after in itertools.pairwise(versions):
        update = {n: (after[n].float() - before[n].float()).reshape(-1) for n in names}
        sums = {
            n: _matrix_sums(
                *(d[n].reshape(versions[0][n].shape) for d in (update, earlier, seen)), rank
            )
            for n in names
        }
        parts = (update, earlier, seen, sums)
        per_block = {b: _group_stats(ns, *parts) for b, ns in blocks.items()}
        stats = _group_stats(names, *parts)
        if inputs is not None:
            t = len(per_task)
            changes = [output_change(before, update, inputs[j]) for j in range(t + 1)]
            stats["output_change_own"] = changes[t]
            if t:
                stats["output_change_earlier"] = sum(changes[:t]) / t
        per_task.append({**stats, "blocks": per_block})
        for n in names:
            earlier[n] += update[n]
            seen[n] |= update[n] != 0
    return per_task


# ------------------------------------------------------------------------------- loss


def run_config(run_dir: Path) -> Any:
    """The run's own validated config (config.yaml): what was trained, --set included."""
    from trainer.config import RunConfig

    return RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _stream(cfg: Any, rows: int) -> list[Any]:
    """The run's tasks with `rows` rows of each dev.json (its training rows are the same)."""
    from trainer.data import load_stream

    return load_stream(cfg.data.model_copy(update={"eval_rows": rows}), cfg.train.seed)


def _base_model(cfg: Any, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """(the run's encoder, its base model in fp32 on `device`): one load for every
    measurement."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import Encoder

    enc = Encoder(
        AutoTokenizer.from_pretrained(cfg.model), cfg.data.max_length, cfg.data.prompt_format
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    return enc, model.to(device).eval()


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a version's weights (on the CPU) into the model, wherever it lives; a name it
    lacks is an error, not a no-op."""
    loaded = model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False)
    if loaded.unexpected_keys:
        raise SystemExit(f"weights the model does not have: {loaded.unexpected_keys[:3]}")


def loss_by_version(
    model: torch.nn.Module, enc: Any, tasks: list[Any], states: list[dict], batch_size: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Held-out loss of the tasks (their dev rows) on each version in `states` (0 = the
    base): matrix[v][j] for every task on the base and the tasks trained by then on each
    version (None for the others: forgetting does not read them)."""
    from trainer.data import held_out_loss

    matrix = []
    for v, state in enumerate(states):
        _load(model, state)
        with torch.no_grad():
            matrix.append(
                [
                    held_out_loss(model, enc, t, batch_size, device) if v == 0 or j < v else None
                    for j, t in enumerate(tasks)
                ]
            )
    summary = loss_summary(matrix)
    names = [t.name for t in tasks]
    summary["forgetting"] = dict(zip(names, summary["forgetting"], strict=False))
    return {"tasks": names, **summary}


def loss_summary(matrix: list[list[float | None]]) -> dict[str, Any]:
    """From the loss matrix (versions 0..T x tasks): each earlier task's forgetting (after
    the last task minus right after its own) and the rise per merge (rise_per_merge[k]:
    the merge of task k + 1, the change of tasks 0..k)."""
    n = len(matrix) - 1
    if any(len(row) != n for row in matrix):
        raise ValueError(f"a loss matrix of {n + 1} versions needs {n} tasks per row")
    forgetting = [matrix[n][j] - matrix[j + 1][j] for j in range(n - 1)]
    return {
        "matrix": matrix,
        "forgetting": forgetting,
        "mean_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
        "rise_per_merge": [
            [matrix[v][j] - matrix[v - 1][j] for j in range(v - 1)] for v in range(2, n + 1)
        ],
    }


def merge_scale_losses(
    model: torch.nn.Module, enc: Any, tasks: list[Any], states: list[dict],
    matrix: list[list[float | None]], scales: list[float], batch_size: int, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """The merge scale (point 4's last listed cause): per merge after the first (version
    v >= 2, on top of v - 1), its own task's held-out loss and the earlier tasks' mean rise
    over version v - 1 with the task's update applied at each scale s (v - 1 plus s times
    the update; scale 1, the run as exported, is read from the loss matrix, which must have
    been measured on the same rows and device): does a shorter step keep the task and spare
    the earlier ones?"""
    from trainer.data import held_out_loss

    merges = []
    for v in range(2, len(states)):
        previous, new = states[v - 1], states[v]
        changed = [n for n in new if new[n] is not previous[n]]  # unchanged ones are shared
        own, rise = {1.0: matrix[v][v - 1]}, {1.0: _mean_rise(matrix[v], matrix[v - 1], v - 1)}
        for scale in scales:
            step = {n: previous[n].float() + scale * (new[n].float() - previous[n].float())
                    for n in changed}  # fmt: skip
            _load(model, {**previous, **step})
            with torch.no_grad():
                losses = [held_out_loss(model, enc, t, batch_size, device) for t in tasks[:v]]
            own[scale], rise[scale] = losses[v - 1], _mean_rise(losses, matrix[v - 1], v - 1)
        order = sorted(own)
        merges.append({
            "task": tasks[v - 1].name,
            "scales": order,
            "own_loss": [own[k] for k in order],
            "earlier_rise": [rise[k] for k in order],
        })  # fmt: skip
    return {"scales": scales, "device": device.type, "merges": merges}


def _scales_of(row: dict[str, Any]) -> list[float] | None:
    """The merge scales a saved row was measured at (None: not measured)."""
    return row.get("merge_scales", {}).get("scales")


def _mean_rise(after: list, before: list, n: int) -> float:
    """Mean of after[j] - before[j] over the first n tasks."""
    return sum(after[j] - before[j] for j in range(n)) / n


def _version_states(model_dir: Path, run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The base checkpoint and every version of the run, in order, each the previous one
    plus the task's exported delta (jlserve's delta code checks every step against the
    version's fingerprint), so a run that kept only its last merged checkpoint is measured
    as well. Unchanged tensors are shared between versions, not copied."""
    versions = json.loads((run_dir / "run.json").read_text())["versions"]
    states = [load_tensors(model_dir)]
    digests = TensorDigests(states[0])
    for v in versions[1:]:
        path = run_dir / "deltas" / v["delta"]
        try:
            planned = plan_update(states[-1], digests, read_delta(path), source=str(path))
        except JlserveError as exc:
            raise SystemExit(f"{run_dir}: version {v['version']}: {exc}") from None
        states.append({**states[-1], **planned.changed})
        digests = planned.digests
    return states


def _keep_input(into: list[torch.Tensor]) -> Any:
    """A forward pre-hook appending its module's input (L, d_in) of a batch of one, on the
    CPU beside the updates it is multiplied with."""
    return lambda _module, args: into.append(args[0][0].detach().cpu())


def layer_inputs(
    model: torch.nn.Module, enc: Any, tasks: list[Any], base: dict, names: list[str]
) -> list[dict[str, torch.Tensor]]:
    """Per task, the inputs (tokens, d_in) each adapted weight in `names` sees on the task's
    dev rows (prompt and answer, one row at a time, no padding), on the base weights `base`:
    where the tasks' activations lie. The model runs where it lives."""
    device = next(model.parameters()).device
    _load(model, base)
    per_task = []
    for task in tasks:
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        hooks = [
            model.get_submodule(n.removesuffix(".weight")).register_forward_pre_hook(
                _keep_input(seen[n])
            )
            for n in names
        ]
        with torch.no_grad():
            for prompt, target in enc.pairs(task, task.dev):
                model(input_ids=torch.tensor([prompt + target], device=device), use_cache=False)
        for hook in hooks:
            hook.remove()
        per_task.append({n: torch.cat(xs) for n, xs in seen.items()})
    return per_task


def _loaded(run_dir: Path, device: torch.device) -> tuple[Any, list[dict], Any, torch.nn.Module]:
    """A finished run's config, every version (rebuilt from its deltas), encoder and base
    model on `device`."""
    cfg = run_config(run_dir)
    states = _version_states(cfg.model, run_dir)
    return (cfg, states, *_base_model(cfg, device))


def measure(
    run_dir: Path, loss_rows: int | None, input_rows: int, device: torch.device,
    merge_scales: list[float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A finished run's measurements, every version and the base model loaded once: the
    update statistics (with the output change on `input_rows` dev rows per task) and, unless
    `loss_rows` is None (--remeasure keeps the loss), the loss per version and, given
    `merge_scales`, the merges at those scales. The model's forward passes run on `device`;
    the update statistics on the CPU."""
    cfg, states, enc, model = _loaded(run_dir, device)
    names = [n for n in states[0] if n.endswith(tuple(f"{t}.weight" for t in cfg.adapter.targets))]
    inputs = None
    if input_rows:
        inputs = layer_inputs(model, enc, _stream(cfg, input_rows), states[0], names)
    out: dict[str, Any] = {"updates": update_stats(states, names, cfg.adapter.r, inputs)}
    if loss_rows is not None:
        tasks = _stream(cfg, loss_rows)
        batch_size = cfg.train.eval_batch_size
        loss = loss_by_version(model, enc, tasks, states, batch_size, device)
        out["loss"] = {**loss, "rows": loss_rows}
        if merge_scales:
            out["merge_scales"] = merge_scale_losses(
                model, enc, tasks, states, loss["matrix"], merge_scales, batch_size, device
            )
    return out


def measure_merge_scales(
    run_dir: Path, loss: dict[str, Any], scales: list[float], device: torch.device
) -> dict[str, Any]:
    """merge_scale_losses on a finished run whose loss matrix (`loss`, from its row) was
    measured on the same held-out rows and device."""
    cfg, states, enc, model = _loaded(run_dir, device)
    tasks = _stream(cfg, loss["rows"])
    batch_size = cfg.train.eval_batch_size
    return merge_scale_losses(model, enc, tasks, states, loss["matrix"], scales, batch_size, device)


def run_row(
    run_dir: Path, loss_rows: int, input_rows: int, device: torch.device,
    merge_scales: list[float] | None,
) -> dict[str, Any]:  # fmt: skip
    """One finished run's row: its measurements (and where they ran) and training speed."""
    tasks = json.loads((run_dir / "metrics.json").read_text())["tasks"]
    return {
        "run_dir": str(run_dir),
        **measure(run_dir, loss_rows, input_rows, device, merge_scales),
        "device": device.type,
        "log_thresholds": [t.get("log_threshold") for t in tasks],
        "s_per_step": sum(t["train_seconds"] for t in tasks) / sum(t["steps"] for t in tasks),
    }


# ----------------------------------------------------------------------------- report


def _f(x: float | None, fmt: str = ".3f") -> str:
    """A number for a table cell, '-' when it was not measured."""
    return "-" if x is None else format(x, fmt)


def _mean(updates: list[dict], key: str) -> float | None:
    """Mean of `key` over the tasks that have it (the overlaps start at the second)."""
    values = [u[key] for u in updates if key in u]
    return sum(values) / len(values) if values else None


LOSS_NOTE = (
    "Held-out loss (nats per target token): forgetting = an earlier task's loss after the "
    "last task minus right after its own (positive: forgotten); the rise per merge is the "
    "mean over the earlier tasks."
)
UPDATE_NOTE = (
    "Each task's update (new minus previous weights; means over tasks 1..T, the overlaps "
    "over tasks 2..T): support on earlier = share of its changed coordinates that an "
    "earlier task changed (chance: a random support of the same size in each matrix); "
    "energy on earlier = share of its squared norm there; top on earlier top = share of "
    f"its top {100 * TOP_SHARE:g} % entries among the earlier sum's top {100 * TOP_SHARE:g} % "
    f"(chance {TOP_SHARE:g}); cos = cosine with the earlier sum; low-rank = share of its "
    "squared norm in the top r singular directions per matrix; column conc. = share in its "
    f"heaviest {100 * COLUMN_SHARE:g} % input columns; heavy cols on earlier = share of "
    f"those that are the earlier sum's heaviest too (chance {COLUMN_SHARE:g}); output change "
    "= how far it moves the adapted layers' outputs, relative to them, on its own task's "
    "held-out inputs (own) and on the earlier tasks' (earlier)."
)


MERGE_SCALE_NOTE = (
    "Merge scale (--merge-scales): each merge after the first applied at a fraction of its "
    "update (1 = as exported) on the previous version: its own task's held-out loss and the "
    "earlier tasks' mean rise over the previous version."
)


def loss_table(rows: list[dict]) -> list[str]:
    """Forgetting in held-out loss per variant (this script's summary and docs/benchmarks.md)."""
    lines = [
        "| variant | mean forgetting | per task | mean rise per merge (tasks 2..T) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        loss = r["loss"]
        per_task = ", ".join(f"{task} {v:+.3f}" for task, v in loss["forgetting"].items())
        rises = ", ".join(f"{sum(m) / len(m):+.3f}" for m in loss["rise_per_merge"])
        lines.append(f"| {r['variant']} | {loss['mean_forgetting']:+.3f} | {per_task} | {rises} |")
    return lines


def update_table(rows: list[dict]) -> list[str]:
    """The update statistics per variant, means over tasks (UPDATE_NOTE says which)."""
    lines = [
        "| variant | density % | norm | mean abs on support | support on earlier (chance) | energy on earlier | top on earlier top | cos | low-rank | column conc. | heavy cols on earlier | output change own | output change earlier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ups = r["updates"]
        later = ups[1:]
        density = _mean(ups, "density")
        lines.append(
            f"| {r['variant']} | {_f(None if density is None else 100 * density, '.2f')} | "
            f"{_f(_mean(ups, 'norm'), '.2f')} | {_f(_mean(ups, 'mean_abs_on_support'), '.2e')} | "
            f"{_f(_mean(later, 'support_on_earlier'), '.2f')} "
            f"({_f(_mean(later, 'support_on_earlier_chance'), '.2f')}) | "
            f"{_f(_mean(later, 'energy_on_earlier'), '.2f')} | "
            f"{_f(_mean(later, 'top_on_earlier_top'), '.2f')} | "
            f"{_f(_mean(later, 'cos_with_earlier'), '+.3f')} | "
            f"{_f(_mean(ups, 'low_rank_energy'))} | {_f(_mean(ups, 'column_concentration'))} | "
            f"{_f(_mean(later, 'heavy_columns_on_earlier'))} | "
            f"{_f(_mean(ups, 'output_change_own'), '.2e')} | "
            f"{_f(_mean(later, 'output_change_earlier'), '.2e')} |"
        )
    return lines


def merge_scale_table(rows: list[dict]) -> list[str]:
    """Per variant and merge: its own task's loss and the earlier tasks' rise at each scale."""
    lines = [
        "| variant | merge | scale | own task's loss | earlier tasks' mean rise |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for m in r["merge_scales"]["merges"]:
            for k, scale in enumerate(m["scales"]):
                lines.append(
                    f"| {r['variant']} | {m['task']} | {scale:g} | {m['own_loss'][k]:.3f} | "
                    f"{m['earlier_rise'][k]:+.3f} |"
                )
    return lines


def markdown(result: dict) -> str:
    """The summary's two tables (loss, updates) and the loss matrices."""
    lines = [
        f"# Merge interference ({result['created']})",
        "",
        f"Model `{result['model']}`, tasks {', '.join(result['tasks'])}; {result['settings']}",
        "",
        LOSS_NOTE,
        "",
        *loss_table(result["rows"]),
        "",
        UPDATE_NOTE,
        "",
        *update_table(result["rows"]),
        "",
    ]
    if scaled := [r for r in result["rows"] if "merge_scales" in r]:
        lines += [MERGE_SCALE_NOTE, "", *merge_scale_table(scaled), ""]
    lines += [
        "Loss matrices (row: version, 0 = base; column: task):",
        "",
    ]
    for r in result["rows"]:
        lines.append(f"- {r['variant']}: " + "; ".join(
            "[" + ", ".join(_f(x) for x in row) + "]" for row in r["loss"]["matrix"]
        ))  # fmt: skip
    lines += ["", *rows_machine_lines(result["rows"], result["machine"]), ""]
    return "\n".join(lines)


def write_summary(tag: str, model: Path, tasks: list[str], settings: dict) -> None:
    """bench/results/interference_<tag>.json and .md from every finished variant of the
    tag run with these settings (after every variant: a long run is readable as it goes)."""
    rows_dir = RESULTS / "interference" / tag
    rows = [
        row
        for name in VARIANTS
        if (rows_dir / f"{name}.json").is_file()
        and (row := json.loads((rows_dir / f"{name}.json").read_text()))["settings"] == settings
    ]
    if not rows:
        return
    result = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": str(model.name),
        "tag": tag,
        "tasks": tasks,
        "settings": json.dumps(settings),
        "machine": machine_info(),
        "rows": rows,
    }
    write_summary_files(f"interference_{tag}", result, markdown)


def main() -> int:
    """Train, measure and summarise each variant not yet done; 2 on a settings mismatch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2")
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--order", default="short_order_1")
    parser.add_argument("--tasks", nargs="+", help="a custom stream (overrides --order)")
    parser.add_argument("--seed", type=int, default=42, help="train.seed: also draws the rows")
    parser.add_argument("--train-rows", type=int, default=128)
    parser.add_argument("--loss-rows", type=int, default=100, help="held-out rows per task")
    parser.add_argument(
        "--input-rows", type=int, default=8, help="held-out rows per task for the output change"
    )
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--variants", nargs="+", default=["incLoRA", "incLoRA+jump", "incLoRA+topk"],
        choices=list(VARIANTS),
        help=f"({', '.join(MATCHED_DENSITY)}: --measure-only, its density is its match's)",
    )  # fmt: skip
    parser.add_argument("--tag", help="result set name (default: <order>-seed<seed>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the runs are trained")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="train nothing: measure the finished runs under --runs/<tag>/ as they are "
        "(e.g. --runs runs/bench/cl_quality: that benchmark's runs, from their deltas)",
    )
    parser.add_argument(
        "--merge-scales",
        nargs="+",
        type=float,
        metavar="S",
        help="also measure each merge after the first applied at these fractions of its update "
        "(e.g. 0.5 0.75; kept rows get them without being measured again)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the measurements' forward passes run (auto: cuda when present)",
    )
    parser.add_argument("--force", action="store_true", help="re-run finished variants")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the updates of finished variants' kept runs again (the loss is kept)",
    )
    args = parser.parse_args()
    if args.remeasure and args.force:
        parser.error("--remeasure measures the kept runs again, --force trains them again: one")
    if not args.measure_only and (matched := set(args.variants) & set(MATCHED_DENSITY)):
        parser.error(
            f"{', '.join(sorted(matched))}: trained at a density another benchmark's run "
            "measured; --measure-only measures its run from bench/cl_quality.py"
        )
    if args.measure_only and args.force:
        parser.error("--measure-only trains nothing; --force would train again")
    if any(not 0 <= scale <= 2 for scale in args.merge_scales or ()):
        parser.error(f"--merge-scales: fractions of the update in [0, 2], got {args.merge_scales}")
    if args.merge_scales:  # (compared with a row's: one order, no repeats)
        args.merge_scales = sorted(set(args.merge_scales))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    stream = {"tasks": args.tasks, "order": None} if args.tasks else {"order": args.order}
    tag = args.tag or f"{'-'.join(args.tasks) if args.tasks else args.order}-seed{args.seed}"
    data = {"root": str(args.data.resolve()), **stream, "train_rows": args.train_rows}
    data["max_length"] = args.max_length
    base_cfg = {
        "model": str(args.model),
        "data": {**data, "eval_rows": 1},  # generation is not what this measures
        "adapter": {"r": 8, "alpha": 32},
        "train": {"batch_size": args.batch_size, "eval_schedule": "needed", "seed": args.seed},
        # (no longer read: versions are rebuilt from the deltas; kept because the saved
        # rows' settings record it, and a rerun of their tag must compare equal)
        "keep_all_merged": True,
    }
    settings = {
        **{k: v for k, v in base_cfg.items() if k != "model"},
        "loss_rows": args.loss_rows,
        "overrides": args.set,
    }
    if args.measure_only:  # what was trained is each run's own config (in its row)
        settings = {"measured": str(args.runs.resolve() / tag), "loss_rows": args.loss_rows}
    rows_dir = RESULTS / "interference" / tag
    rows_dir.mkdir(parents=True, exist_ok=True)
    task_names: list[str] = []
    for name in args.variants:
        row_path = rows_dir / f"{name}.json"
        run_dir = args.runs / tag / name.replace("+", "_")
        if row_path.is_file() and not args.force:
            row = json.loads(row_path.read_text())
            # (measured runs name their own model, in their config)
            other_model = row.get("model", str(args.model)) != str(args.model)
            if row.get("settings") != settings or (other_model and not args.measure_only):
                diff = settings_difference(row.get("settings"), settings)
                print(f"== {name}: saved with other settings ({diff}); use another --tag")
                return 2
            run_dir = Path(row.get("run_dir", run_dir))
            has_run = (run_dir / "run.json").is_file()
            wants_scales = bool(args.merge_scales) and _scales_of(row) != args.merge_scales
            measured_on = row.get("device", "cpu")  # (rows from before --device: the CPU)
            why_not = ""  # the merge scales read the row's loss: same run, same device
            if wants_scales and not has_run:
                why_not = "; its run is gone: no merge scales"
            elif wants_scales and measured_on != device.type:
                why_not = f"; its loss was measured on {measured_on}: --device {measured_on}"
            wants_scales = wants_scales and not why_not
            if not args.remeasure and not wants_scales:
                print(f"== {name}: kept ({row_path}){why_not}", flush=True)
                task_names = row["loss"]["tasks"]
                continue
            if not has_run:
                print(f"== {name}: no kept run at {run_dir} to measure again")
                return 2
            if args.remeasure:
                row.update(measure(run_dir, None, args.input_rows, device))  # the loss stays
            if wants_scales:
                print(f"== {name}: merge scales {args.merge_scales}", flush=True)
                row["merge_scales"] = measure_merge_scales(
                    run_dir, row["loss"], args.merge_scales, device
                )
        else:
            if args.measure_only:
                if not (run_dir / "metrics.json").is_file():
                    print(f"== {name}: no finished run at {run_dir}; not measured", flush=True)
                    continue
            else:
                if args.force and run_dir.exists():
                    shutil.rmtree(run_dir)
                run_variant(name, base_cfg, args.set, run_dir, "in_process", VARIANTS[name][1])
            cfg = run_config(run_dir)
            row = {
                "variant": name,
                "model": str(cfg.model),
                **run_row(run_dir, args.loss_rows, args.input_rows, device, args.merge_scales),
            }
            if args.measure_only:
                row["config"] = cfg.model_dump(mode="json")
            row.update(settings=settings, machine=machine_info(), load_average=os.getloadavg())
        row["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        row_path.write_text(json.dumps(row, indent=2))
        task_names = row["loss"]["tasks"]
        write_summary(tag, args.model, task_names, settings)
    write_summary(tag, args.model, task_names, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
