"""Section 1: hot-swap latency against an engine restart (bench/hot_swap.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.common import median
from bench.report.shared import mb, ms, pct, provenance, save_figure


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    rows = doc["per_density"]
    restart = doc["restart_median_s"]
    bw = doc["memory_bandwidth_bytes_per_s"]
    out = [
        "## 1. Hot-swap: live update vs engine restart",
        "",
        provenance(doc),
        "",
        f"Targets: {doc['targets']} weights ({doc['target_numel'] / 1e6:.1f} M entries) of "
        f"`{Path(doc['model']).name}`; {doc['rounds']} round(s), medians. Restart = plain vLLM "
        f"on the merged checkpoint, process start to first completion: median "
        f"**{restart:.1f} s** (runs: {', '.join(f'{s:.1f}' for s in doc['restart_s'])}). "
        f"jlserve's own startup (same measure): "
        f"{', '.join(f'{s:.1f}' for s in doc['jlserve_startup_s'])} s. "
        f"Memory copy bandwidth: {bw / 1e9:.1f} GB/s.",
        "",
        "| density | changed coords | delta file MB | update (client) ms | update -> first completion ms | server total ms | parse | plan | stage | wait | apply | commit | floor: changed bytes / bw ms | floor: reload path ms | restart / update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["server_timings_median"]
        out.append(
            f"| {pct(r['density'])} | {r['nnz']:,} | {mb(r['delta_file_bytes'])} | "
            f"{ms(r['client_update_s'])} | {ms(r['update_to_first_completion_s'])} | "
            f"{ms(t['total_s'])} | {ms(t['parse_s'])} | {ms(t['plan_s'])} | "
            f"{ms(t['stage_s'])} | {ms(t['wait_s'])} | {ms(t['apply_s'])} | "
            f"{ms(t['commit_s'])} | {r['floor_changed_bytes_s'] * 1e3:.3f} | "
            f"{r['floor_reload_path_s'] * 1e3:.2f} | **{r['restart_over_update']:.0f}x** |"
        )
    target = doc["target"]
    at = next((r for r in rows if r["density"] == target["density"]), None)
    out.append("")
    per_round = [
        doc["restart_s"][s["round"]] / s["update_to_first_completion_s"]
        for s in doc["swaps"]
        if s["density"] == target["density"]
    ]
    firsts, later = [], []
    for s in doc["swaps"]:
        first_of_round = s is next(x for x in doc["swaps"] if x["round"] == s["round"])
        (firsts if first_of_round else later).append(s["server_timings"]["plan_s"])
    if per_round:
        out += [
            f"Per round (restart and swaps measured minutes apart, same load), restart / update "
            f"at {pct(target['density'])}: {', '.join(f'{r:.0f}x' for r in per_round)}. The "
            f"first update after a server start is slower (plan step median "
            f"{ms(median(firsts))} ms vs {ms(median(later))} ms for later ones, likely the "
            f"first touch of the host copy and code paths); the density order is rotated per "
            f"round, so each round puts that cost on another density.",
            "",
        ]
    if at is not None:
        verdict = "met" if target["met"] else "**missed**"
        out.append(
            f"At {pct(target['density'])} density a live update (POST until the first completion "
            f"on the new version) takes {ms(at['update_to_first_completion_s'])} ms against "
            f"{restart:.1f} s for a restart, {at['ratio_to_restart']:.4f} of it (medians; worst "
            f"single round 1/{min(per_round):.0f}): the target (<= 1/20 = 0.05) is {verdict}, because a restart re-imports vLLM, reloads all "
            f"weights and re-initialises the engine while the swap only plans the changed "
            f"coordinates on the host copy and reloads the touched fused modules."
        )
    slope = rows[-1]["server_timings_median"]["total_s"] / max(
        rows[0]["server_timings_median"]["total_s"], 1e-9
    )
    ref = at or rows[-1]
    parts = {
        k: v for k, v in ref["server_timings_median"].items() if k not in ("total_s", "paused_s")
    }
    top = sorted(parts, key=parts.get, reverse=True)[:3]
    out.append(
        f"The server's time grows {slope:.1f}x from {pct(rows[0]['density'])} to "
        f"{pct(rows[-1]['density'])} density and stays far above the bandwidth floors; at "
        f"{pct(ref['density'])} its largest steps are "
        + ", ".join(f"{k[:-2]} {ms(parts[k])} ms" for k in top)
        + ": 'plan' checks the delta against the model and re-hashes every touched tensor "
        "for the fingerprint, 'parse' reads and checks the file (format v2 + zstd, the "
        "default), and 'apply' is vLLM's "
        "`reload_weights` of complete fused q/k/v modules (on CPU the weights are "
        "oneDNN-repacked, so no in-place sparse write is possible), each a fixed per-tensor "
        "cost rather than a per-byte one."
    )
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [r["density"] * 100 for r in rows]
    ax.plot(
        xs,
        [r["update_to_first_completion_s"] for r in rows],
        "o-",
        label="update -> first completion (client)",
    )
    ax.plot(xs, [r["server_timings_median"]["total_s"] for r in rows], "s-", label="server total")
    ax.plot(
        xs,
        [r["server_timings_median"]["apply_s"] for r in rows],
        "^-",
        label="server apply (engine reload)",
    )
    ax.plot(
        xs, [r["floor_reload_path_s"] for r in rows], ":", label="floor: fused modules / bandwidth"
    )
    ax.plot(
        xs,
        [r["floor_changed_bytes_s"] for r in rows],
        "--",
        label="floor: changed bytes / bandwidth",
    )
    ax.axhline(restart, color="red", label=f"restart on merged checkpoint ({restart:.1f} s)")
    ax.axhline(restart / 20, color="red", ls="--", lw=0.8, label="target: restart / 20")
    ax.set(
        xscale="log", yscale="log", xlabel="delta density (% of target weights)", ylabel="seconds"
    )
    ax.set_title(f"Hot-swap latency vs density ({Path(doc['model']).name}, {doc['targets']})")
    ax.legend(fontsize=7)
    out += ["", save_figure(fig, doc, img, "hot_swap", md_dir), ""]
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """The hot-swap row of the targets at a glance."""
    t = doc["target"]
    if t["ratio"] is None:
        return []
    return [
        f"| hot-swap | update <= 1/20 of restart at 5 % | {t['ratio']:.4f} of restart "
        f"(1/{1 / t['ratio']:.0f}) | {'yes' if t['met'] else 'no'} |"
    ]
