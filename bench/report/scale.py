"""Section 7: serving at scale, jlserve against plain vLLM on a random Llama of its own
(bench/scale.py): start and restart times, memory (bench/report/scale_memory.py) and swaps
(bench/report/scale_swaps.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.common import median
from bench.report.scale_memory import memory_sentence, memory_tables, uss_by_role
from bench.report.scale_swaps import swap_sentences, swap_table
from bench.report.shared import pct, provenance, save_figure

SERVERS = {  # result key -> label
    "jlserve": "jlserve serve, fresh",
    "vllm": "plain vLLM, base",
    "jlserve_chain": "jlserve serve, restarted with 10 deltas",
    "vllm_merged": "plain vLLM, merged checkpoint",
}


def title(params: float) -> str:
    return (
        f"7. Serving at scale: jlserve vs plain vLLM on a random {params / 1e9:.1f} B Llama "
        "(bench/scale.py)"
    )


MISSING = (  # (heading, what to say until it has results)
    title(1.5e9),
    "_Not yet run at 1.5 B: `python -m bench.scale` (about 30-40 min on 2 quiet cores; "
    "`--quick` for 0.2 B and one round)._",
)


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    shape, chain, runs = doc["shape"], doc["chain"], {}
    for rnd in doc["rounds"]:
        for key, run in rnd.items():
            runs.setdefault(key, []).append(run)
    start, restart = doc["start"], doc["restart_chain"]
    s = doc["startup_median_s"]
    chain_nnz = median([d["nnz"] for d in chain["deltas"]])
    out = [
        f"## {title(doc['params'])}",
        "",
        provenance(doc),
        "",
        f"A random Llama-shaped checkpoint (bf16, N(0, 0.02), untied lm_head; hidden "
        f"{shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, "
        f"{shape['heads']} heads / {shape['kv_heads']} KV heads, vocab {shape['vocab']}): "
        f"**{doc['params'] / 1e9:.3f} B parameters, {doc['checkpoint_bytes'] / 2**30:.2f} GiB in "
        f"{doc['shards']} safetensors shards**. `jlserve serve` against plain vLLM "
        "(`python -m vllm.entrypoints.openai.api_server`, same engine args), one server at a "
        f"time, {doc['repeats']} round(s) (order alternated between rounds), each server's files read "
        "once before it starts (same page-cache state); medians over rounds. The chain: "
        f"{chain['length']} deltas (format v2), each changing a random "
        f"{pct(chain['density'])} of the {doc['targets']} weights "
        f"({doc['target_numel'] / 1e6:.1f} M entries; {chain_nnz:,.0f} coordinates, "
        f"{median([d['file_bytes'] for d in chain['deltas']]) / 2**10:,.0f} KiB per file), "
        f"{chain['touched_bytes'] / 2**20:.1f} MiB of touched tensors; jlserve restarted on its "
        "state dir replays them onto the base, plain vLLM loads the merged checkpoint (base + "
        "the 10 deltas). Start = process start to the first completion.",
        "",
        "| | jlserve | plain vLLM | jlserve / vLLM | goal | met |",
        "|---|---|---|---|---|---|",
        f"| start to first completion, s (median) | {s['jlserve']:.1f} | {s['vllm']:.1f} | "
        f"**{start['ratio']:.2f}** | <= {start['goal']} | {'yes' if start['met'] else '**no**'} |",
        f"| restart with the chain of {chain['length']} deltas vs vLLM on the merged "
        f"checkpoint, s (median) | {s['jlserve_chain']:.1f} | {s['vllm_merged']:.1f} | "
        f"**{restart['ratio']:.2f}** | <= {restart['goal']} | "
        f"{'yes' if restart['met'] else '**no**'} |",
        "",
    ]
    if doc["repeats"] > 1:
        out += [
            "Per round, s: "
            + "; ".join(
                f"{SERVERS[key]} " + ", ".join(f"{r['startup_s']:.1f}" for r in runs[key])
                for key in SERVERS
                if key in runs
            )
            + ".",
            "",
        ]
    roles = {key: uss_by_role(runs[key]) for key in SERVERS if key in runs}
    out += memory_tables(doc, roles, SERVERS)
    swaps = [w for run in runs.get("jlserve", []) for w in run.get("swaps", [])]
    chain_swaps = [w for run in runs.get("jlserve", []) for w in run.get("chain_swaps", [])]
    out += swap_table(doc, swaps, chain_swaps)
    loads = [
        f"{SERVERS[k]} "
        + ", ".join(f"{r['loadavg_before']:.1f} -> {r['loadavg_after']:.1f}" for r in runs[k])
        for k in SERVERS
        if k in runs
    ]
    swap_loads = [w["loadavg_before"] for w in swaps + chain_swaps if "loadavg_before" in w]
    out += [
        "",
        "Load average (1 min) before -> after each start: "
        + "; ".join(loads)
        + (f"; during the swaps {min(swap_loads):.1f}-{max(swap_loads):.1f}" if swap_loads else "")
        + f" ({doc['machine'].get('cpu_count', '?')} cores: above that, processes waited for a "
        "core).",
        "",
    ]
    sentences = [_start_sentence(doc), memory_sentence(doc, roles), *swap_sentences(doc)]
    out += [" ".join(sentences), ""]
    out += [_figure(doc, img, md_dir), ""]
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """The scale rows of the targets at a glance: start, restart, memory."""
    size = f"{doc['params'] / 1e9:.1f} B"
    lines = []
    for label, key, what in (
        ("start", "start", "jlserve / vLLM start to first completion"),
        ("restart", "restart_chain", "jlserve restart with 10 deltas / vLLM on merged"),
    ):
        t = doc[key]
        lines.append(
            f"| scale ({size}): {label} | {what} <= {t['goal']} | {t['ratio']:.2f} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    m, mc = doc["memory"], doc["memory_after_chain"]
    lines.append(
        f"| scale ({size}): memory | jlserve - vLLM USS <= touched + 10 % of checkpoint | "
        f"{m['extra_uss_mib']:+.0f} MiB at start (goal {m['goal_max_extra_mib']:.0f}), "
        f"{mc['extra_uss_mib']:+.0f} MiB after 10 deltas (goal "
        f"{mc['goal_max_extra_mib']:.0f}) | {'yes' if m['met'] and mc['met'] else 'no'} |"
    )
    return lines


def _start_sentence(doc: dict[str, Any]) -> str:
    """The start and restart ratios against their goals, and whether this run can tell."""
    start, restart, chain = doc["start"], doc["restart_chain"], doc["chain"]
    s = doc["startup_median_s"]
    ratios = (
        f"jlserve's start takes {start['ratio']:.2f}x plain vLLM's "
        f"({'met' if start['met'] else '**missed**'}, goal <= {start['goal']}) and its restart "
        f"with {chain['length']} deltas to replay {restart['ratio']:.2f}x plain vLLM's start on "
        f"the merged checkpoint ({'met' if restart['met'] else '**missed**'}, goal <= "
        f"{restart['goal']})"
    )
    vllm_spread = max(s["vllm"], s["vllm_merged"]) / min(s["vllm"], s["vllm_merged"])
    margin = min(start["goal"], restart["goal"]) - 1
    if start["met"] and restart["met"]:
        return (
            f"{ratios}: jlserve starts the same vLLM engine on the same base files; on a "
            "restart its loader (`--load-format jlserve`) applies the recorded deltas as the "
            "base streams in, and the API server re-plans the chain on its memory-mapped "
            "host copy (hashing only the touched tensors)."
        )
    if vllm_spread - 1 > margin:
        return (
            f"{ratios}. Plain vLLM itself started in {s['vllm']:.1f} s on the base and "
            f"{s['vllm_merged']:.1f} s on the merged checkpoint, the same work on files of the "
            f"same size: a {vllm_spread:.2f}x spread, wider than the goals' margins, so "
            f"{'with one round ' if doc['repeats'] == 1 else ''}on this loaded machine the start "
            "ratios are not conclusive."
        )
    return (
        f"{ratios}; plain vLLM's two starts differ by only {100 * (vllm_spread - 1):.0f} %, "
        "so the gap is jlserve's own start work (plugin, state dir, the replay of the "
        "chain), not this run's noise."
    )


def _figure(doc: dict[str, Any], img: Path, md_dir: Path) -> str:
    """Start times and USS, jlserve's bars beside plain vLLM's, each under its goal."""
    start, restart, chain = doc["start"], doc["restart_chain"], doc["chain"]
    s = doc["startup_median_s"]
    mem, mem_chain = doc["memory"], doc["memory_after_chain"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    x = [0, 1]
    _paired_bars(
        axes[0],
        [s["jlserve"], s["jlserve_chain"]],
        [s["vllm"], s["vllm_merged"]],
        [start["goal"] * s["vllm"], restart["goal"] * s["vllm_merged"]],
        "goal (x vLLM)",
    )
    axes[0].set_xticks(x, ["start", f"restart, {chain['length']} deltas\n(vLLM: merged)"])
    axes[0].set(ylabel="seconds to first completion", title="start (median)")
    _paired_bars(
        axes[1],
        [mem["jlserve_uss_mib"], mem_chain["jlserve_uss_mib"]],
        [mem["vllm_uss_mib"], mem_chain["vllm_uss_mib"]],
        [m["vllm_uss_mib"] + m["goal_max_extra_mib"] for m in (mem, mem_chain)],
        "goal: vLLM + touched + 10 %",
    )
    axes[1].set_xticks(x, ["fresh start", f"after {chain['length']} deltas"])
    axes[1].set(ylabel="MiB", title="USS of the process tree")
    for ax in axes:  # room above the bars for the legend
        ax.set_ylim(0, 1.35 * max(p.get_height() for p in ax.patches))
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.suptitle(f"{doc['params'] / 1e9:.2f} B random Llama, {doc['shards']} shards", fontsize=9)
    return save_figure(fig, doc, img, "scale", md_dir)


def _paired_bars(
    ax: Any, jlserve: list[float], vllm: list[float], goals: list[float], goal_label: str
) -> None:
    """jlserve's and plain vLLM's bars side by side at x = 0, 1, with a goal mark over
    each jlserve bar."""
    x, w = [0, 1], 0.38
    ax.bar([i - w / 2 for i in x], jlserve, w, label="jlserve", color="C0")
    ax.bar([i + w / 2 for i in x], vllm, w, label="plain vLLM", color="C1")
    ax.hlines(goals, [i - w for i in x], x, colors="red", linestyles="--", label=goal_label)
