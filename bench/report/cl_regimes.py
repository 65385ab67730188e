"""Section 5, continued: the forgetting regimes of issue 24 (bench/forgetting_regime.sh),
one table per regime pooled over its seeds (`cl_quality_<regime>-seed<n>.json`), with the
regime's verdict (does the dense baseline forget: BWT <= -5 points in the mean over at
least 3 seeds) and the key pairs as paired differences over seeds."""

from __future__ import annotations

import json
import math
import re
import statistics
from typing import Any

from bench.common import RESULTS

REGIMES = (  # tag prefix, what it is
    ("so1-x4", "short_order_1 at 4x the steps per task (512 train rows, 64 steps)"),
    (
        "so1-x4-gpu",
        "the same on one H200 (bench/forgetting_regime_gpu.sh): evaluated in process "
        "(transformers greedy generation) instead of through vLLM, fp32, three seeds' chains "
        "sharing the GPU; the same rows per seed, another init (CUDA's generator)",
    ),
    (
        "lo4",
        "long_order_4, 15 tasks at 128 train rows (16 steps), needed-entries schedule, "
        "100 dev rows per task",
    ),
    ("lo4-gpu", "the same on one GPU (bench/forgetting_regime_gpu.sh), evaluated in process"),
)
ABLATIONS = {  # a result set's tag suffix -> what its runs change (bench/forgetting_regime.sh)
    "per-block": "one learned threshold per block (`adapter.granularity=per_block`)",
    "refit-long": "fully sparse from half of each task's steps, the adapter re-fitting under "
    "the gate for longer (`adapter.sparse_schedule=[0.2, 0.5]`; the default [0.2, 0.8])",
    "no-refit": "trained dense and cut once before the merge, no re-fitting under the gate "
    "(`adapter.sparse_schedule=[1, 1]`); the threshold is only initialised (as many entries "
    "as the adapter has parameters) and never trained, a fixed-count cut",
    "grouped": "nothing but the float summation order: the default again, trained on rows "
    "grouped by length (`trainer.step.grouped_loss`, the same loss and gradient), where the "
    "default's runs trained on one padded batch; how far numerical noise alone moves a run",
}
FORGETS_AT = -0.05  # BWT at or below this, in the mean over seeds: the stream forgets
NAIVE_BASELINES = ("incLoRA", "seqLoRA")  # point 1 measures both; incLoRA decides
MIN_SEEDS = 3
PAIRS = (
    ("incLoRA+jump", "incLoRA"),
    ("incLoRA+jump", "incLoRA+topk"),
    ("incLoRA+jump", "incLoRA+topk@jump"),  # top-k at the same density
    ("incLoRA+jump", "incLoRA+jump-ref"),  # ours against the authors' threshold training
    ("ella+jump", "ella"),  # the gate on the other CL methods (point 3)
    ("inflora+jump", "inflora"),
)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for one value)."""
    if len(values) < 2:
        return statistics.fmean(values), None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def _points(mean: float, se: float | None, signed: bool = True) -> str:
    value = round(100 * mean, 1) + 0.0  # + 0.0: no "-0.0"
    body = f"{value:+.1f}" if signed else f"{value:.1f}"
    return body if se is None else f"{body} ± {100 * se:.1f}"


def seed_sets(prefix: str, suffix: str = "") -> dict[int, list[dict[str, Any]]]:
    """seed -> the finished rows of `cl_quality_<prefix>-seed<seed><suffix>.json` (suffix:
    an ablation's, e.g. `-per-block`)."""
    found = {}
    for path in sorted(RESULTS.glob(f"cl_quality_{prefix}-seed*{suffix}.json")):
        name = rf"cl_quality_{re.escape(prefix)}-seed(\d+){re.escape(suffix)}\.json"
        match = re.fullmatch(name, path.name)
        doc = json.loads(path.read_text()) if match else None
        if doc is not None and doc["rows"]:
            found[int(match.group(1))] = doc["rows"]
    return found


def _by_variant(sets: dict[int, list[dict[str, Any]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> its row."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for seed, rows in sets.items():
        for row in rows:
            by_variant.setdefault(row["variant"], {})[seed] = row
    return by_variant


def regime_lines(prefix: str, about: str, sets: dict[int, list[dict[str, Any]]]) -> list[str]:
    """The regime's table (variants x metrics, mean ± SE over seeds) and its verdicts."""
    by_variant = _by_variant(sets)
    out = [
        f"Regime `{prefix}`: {about}. Mean ± standard error over seeds (the seed draws the "
        "rows and the init); BWT and OA in points.",
        "",
        "| variant | seeds | OA % | BWT | BWT per seed | FWT | mean density % | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_seed in by_variant.items():
        rows = [per_seed[s] for s in sorted(per_seed)]
        oa, bwt = mean_se([r["OA"] for r in rows]), mean_se([r["BWT"] for r in rows])
        fwt = [r["FWT"] for r in rows if r.get("FWT") is not None]
        seeds = sorted(per_seed)
        evals = {s: per_seed[s]["eval_s"] for s in seeds if per_seed[s].get("eval_s") is not None}
        trains = {
            s: per_seed[s]["train_s"] for s in seeds if per_seed[s].get("train_s") is not None
        }
        per_seed_bwt = ", ".join(f"{100 * r['BWT']:+.1f}" for r in rows)
        out.append(
            f"| {name} | {', '.join(map(str, sorted(per_seed)))} | {_points(*oa, signed=False)} | "
            f"{_points(*bwt)} | {per_seed_bwt} | "
            f"{_points(*mean_se(fwt)) if fwt else '-'} | "
            f"{100 * sum(r['mean_density'] for r in rows) / len(rows):.2f} | "
            f"{_mean_of(trains, seeds)} | {_mean_of(evals, seeds)} |"
        )
    return [
        *out,
        "",
        *(f"- {s}" for s in verdicts(by_variant)),
        *ablation_lines(prefix, by_variant),
    ]


def ablation_lines(prefix: str, by_variant: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Each ablation's runs (`cl_quality_<prefix>-seed<n>-<ablation>.json`) beside the
    regime's default run of the same variant and seed, and their difference paired by seed
    where two seeds or more have both."""
    out = []
    for suffix, about in ABLATIONS.items():
        for variant, per_seed in _by_variant(seed_sets(prefix, f"-{suffix}")).items():
            defaults = by_variant.get(variant, {})
            parts = []
            for seed, row in sorted(per_seed.items()):
                default = defaults.get(seed)
                versus = (
                    f" (the default: OA {100 * default['OA']:.1f}, BWT "
                    f"{100 * default['BWT']:+.1f}, {100 * default['mean_density']:.2f} %)"
                    if default
                    else ""
                )
                parts.append(
                    f"seed {seed}: OA {100 * row['OA']:.1f}, BWT {100 * row['BWT']:+.1f}, "
                    f"mean density {100 * row['mean_density']:.2f} %{versus}"
                )
            if len(per_seed.keys() & defaults.keys()) > 1:
                parts.append(f"minus the default {paired_difference(per_seed, defaults)}")
            out.append(f"- Ablation `{suffix}`, {about}: {variant}, {'; '.join(parts)}.")
    return out


def paired_difference(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> str:
    """'on seeds 1, 2: BWT +x ± se; OA +y ± se': a minus b over the seeds both have."""
    seeds = sorted(a.keys() & b.keys())
    parts = []
    for key in ("BWT", "OA"):
        parts.append(f"{key} {_points(*mean_se([a[s][key] - b[s][key] for s in seeds]))}")
    over = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    return f"on {over}: {'; '.join(parts)}"


def _mean_of(values: dict[int, float], seeds: list[int]) -> str:
    """The mean over the seeds that recorded a value, naming them when some did not (rows
    from before the value was recorded)."""
    if not values:
        return "-"
    mean = f"{statistics.fmean(values.values()):.0f}"
    if len(values) == len(seeds):
        return mean
    return f"{mean} (seed{'s' if len(values) > 1 else ''} {', '.join(map(str, values))})"


def verdicts(by_variant: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Does each naive dense baseline forget here (the regime is decided by incLoRA, the
    gate's twin), and the key pairs (paired by seed)."""
    out = []
    for baseline in NAIVE_BASELINES:
        dense = by_variant.get(baseline, {})
        if not dense:
            continue
        bwt, se = mean_se([r["BWT"] for r in dense.values()])
        decides = baseline == NAIVE_BASELINES[0]
        if len(dense) < MIN_SEEDS:
            verdict = f"not decided yet ({len(dense)} of {MIN_SEEDS} seeds)"
        elif bwt > FORGETS_AT:
            verdict = "not a forgetting regime" if decides else "does not forget"
        else:
            verdict = "**a forgetting regime**" if decides else "forgets"
        # A mean this close to the bar decides by the letter only: say so.
        near = len(dense) >= MIN_SEEDS and abs(bwt - FORGETS_AT) <= se
        out.append(
            f"{baseline} (dense) BWT {_points(bwt, se)} over {len(dense)} seed(s): {verdict} "
            f"(the bar: <= {100 * FORGETS_AT:+.0f} in the mean over >= {MIN_SEEDS} seeds"
            f"{'; the mean is within one standard error of it' if near else ''})."
        )
    for a, b in PAIRS:
        if by_variant.get(a, {}).keys() & by_variant.get(b, {}).keys():
            out.append(f"{a} minus {b} {paired_difference(by_variant[a], by_variant[b])}.")
    return out


def section(_docs: dict[str, dict[str, Any]]) -> list[str]:
    """Every regime with at least one finished variant."""
    out = []
    for prefix, about in REGIMES:
        sets = seed_sets(prefix)
        if sets:
            out += [*regime_lines(prefix, about, sets), ""]
    if not out:
        return []
    title = "### Forgetting regimes (issue 24, bench/forgetting_regime.sh)"
    analysis = "What each merge does to the earlier tasks, and the ablations: docs/forgetting.md."
    return [title, "", analysis, "", *out]
