"""What section 5's CL-quality rows say against the issue's expectations: the JumpLoRA
variants against their dense counterparts, the learned gate against fixed-ratio top-k, each
OA gap weighed by its standard error."""

from __future__ import annotations

import math
import statistics
from typing import Any


def expectations(rows: list[dict[str, Any]], n_rows: int | None, prefix: str = "") -> list[str]:
    """The issue's expectations, each checked against the rows of one result set that exist,
    each sentence led by `prefix` (which set); n_rows: the dev rows behind one OA (rows per
    task x tasks)."""
    by = {r["variant"]: r for r in rows}
    sentences = []
    for dense in ("incLoRA", "ella", "inflora"):
        jump = f"{dense}+jump"
        if dense in by and jump in by and by[dense]["BWT"] is not None:
            d, j = by[dense], by[jump]
            if min(j["BWT"], d["BWT"]) >= 0:
                verdict = "neither forgets" + ("" if j["BWT"] >= d["BWT"] else "; lower")
            else:
                verdict = "forgets less" if j["BWT"] >= d["BWT"] else "**forgets more**"
            sentences.append(
                f"{jump} vs {dense}: BWT {100 * j['BWT']:+.1f} vs {100 * d['BWT']:+.1f} "
                f"({verdict}), "
                f"OA {100 * j['OA']:.1f} vs {100 * d['OA']:.1f} "
                f"({_oa_verdict(j['OA'], d['OA'], n_rows)})."
            )
    if "incLoRA+jump" in by and "incLoRA+topk" in by:
        j, t = by["incLoRA+jump"], by["incLoRA+topk"]
        sentences.append(
            f"Learned gate vs fixed-ratio top-k (incLoRA): OA {100 * j['OA']:.1f} vs "
            f"{100 * t['OA']:.1f} ({_oa_verdict(j['OA'], t['OA'], n_rows)}), "
            f"mean density {100 * j['mean_density']:.2f} % vs {100 * t['mean_density']:.2f} %."
        )
    for name, row in by.items():
        spread = row.get("task_density")
        if name.endswith("+jump") and spread:
            ok = spread["max"] <= 0.05
            sentences.append(
                f"{name}: per-task density {100 * spread['min']:.2f}-{100 * spread['max']:.2f} % "
                f"({'<= 5 %' if ok else '**above the 5 % target**'})."
            )
    return [prefix + s for s in sentences]


def learned_vs_topk_over_runs(
    sets: list[tuple[str, list[dict[str, Any]]]], n_rows: int | None
) -> list[str]:
    """One sentence pooling the learned gate against top-k over the result sets given (orders,
    seeds; the caller leaves out runs that change the gate) that have both: one run is one
    sample, so a single gap says little."""
    gaps, ses, labels = [], [], []
    for label, rows in sets:
        by = {r["variant"]: r for r in rows}
        if "incLoRA+jump" in by and "incLoRA+topk" in by:
            j, t = by["incLoRA+jump"]["OA"], by["incLoRA+topk"]["OA"]
            gaps.append(100 * (j - t))
            if n_rows:
                ses.append(100 * _difference_se(j, t, n_rows))
            labels.append(label)
    if len(gaps) < 2:
        return []
    mean = statistics.fmean(gaps)
    # the spread over the runs (seeds, orders), and what the evaluation rows alone allow
    errors = [f"standard error over the runs {statistics.stdev(gaps) / math.sqrt(len(gaps)):.1f}"]
    if ses:
        errors.append(
            f"from the evaluation rows alone {math.sqrt(sum(x * x for x in ses)) / len(ses):.1f}"
        )
    return [
        f"Learned gate minus top-k in OA over the {len(gaps)} runs with both "
        f"({'; '.join(labels)}): {', '.join(f'{g:+.1f}' for g in gaps)} points, mean "
        f"{mean:+.1f} ({'; '.join(errors)})."
    ]


def _oa_verdict(a: float, b: float, n_rows: int | None) -> str:
    """OA a against b: at least as high, within one standard error of their difference, or
    lower."""
    if a >= b:
        return "at least as high"
    if n_rows:
        se = _difference_se(a, b, n_rows)
        if b - a <= se:
            return f"lower by less than one standard error, {100 * se:.1f} points"
    return "**lower**"


def _difference_se(a: float, b: float, n_rows: int) -> float:
    """Standard error of the difference of two accuracies over n_rows evaluated rows each."""
    p = (a + b) / 2
    return math.sqrt(2 * p * (1 - p) / n_rows)
