"""Section 2: serving throughput and latency, jlserve against plain vLLM and vLLM with
runtime LoRA (bench/serving.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.report.shared import ms, provenance, save_figure

SERVER_LABELS = {
    "jlserve": "jlserve serve (merged, no task id)",
    "vllm": "plain vLLM",
    "vllm-lora": "vLLM + runtime LoRA (task ids)",
}


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    servers = [s for s in SERVER_LABELS if s in doc["summary"][0]]
    out = [
        "## 2. Serving: jlserve vs plain vLLM vs vLLM runtime LoRA",
        "",
        provenance(doc),
        "",
        f"Streaming completions, fixed prompt, {doc['max_tokens']} output tokens (ignore_eos), "
        f"4 x concurrency requests per level, {doc['rounds']} round(s) with the server order "
        f"rotated, one server at a time, medians over rounds. vLLM + LoRA: "
        f"{doc['lora_tasks']} random r=8 q/v adapters, requests round-robin over the task ids. "
        f"Startup to first completion (s): "
        + ", ".join(f"{s} {min(v):.1f}-{max(v):.1f}" for s, v in doc["startup_s"].items() if v)
        + ".",
        "",
        "| concurrency | server | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | tok/s vs vLLM | TTFT p50 vs vLLM | TPOT p50 vs vLLM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["summary"]:
        for s in servers:
            m = row[s]
            rel = row.get(f"{s}_over_vllm")
            rel_cols = (
                f"**{rel['tok_per_s']:.3f}** | {rel['ttft_p50_s']:.2f} | {rel['tpot_p50_s']:.2f}"
                if rel
                else "1 | 1 | 1"
            )
            out.append(
                f"| {row['concurrency']} | {s} | {m['tok_per_s']:.1f} | {ms(m['ttft_p50_s'])} | "
                f"{ms(m['ttft_p99_s'])} | {ms(m['tpot_p50_s'])} | {ms(m['tpot_p99_s'])} | {rel_cols} |"
            )
    target = doc["target"]
    if target["worst_ratio"] is not None:
        ratios = [r["jlserve_over_vllm"]["tok_per_s"] for r in doc["summary"]]
        verdict = "met" if target["met"] else "**missed**"
        vllm_runs = [r for r in doc["runs"] if r["server"] == "vllm"]
        spreads = []
        for c in doc["concurrency"]:
            tps = [r["tok_per_s"] for r in vllm_runs if r["concurrency"] == c]
            if len(tps) > 1:
                spreads.append((max(tps) - min(tps)) / (sum(tps) / len(tps)))
        spread = max(spreads) if spreads else None
        gap = 1 - target["worst_ratio"]
        if target["met"]:
            why = (
                "jlserve serves through vLLM's own server and engine and adds only a version "
                "middleware and a request gate per request (ratios above 1 are noise in its "
                "favour: the engine is the same)"
            )
        elif spread is not None and gap <= spread:
            why = (
                f"the shortfall ({100 * gap:.1f} %) is smaller than plain vLLM's own "
                f"round-to-round spread ({100 * spread:.0f} %) on this shared machine, and jlserve "
                f"adds only a version middleware and a request gate per request, so this run "
                f"cannot tell it from noise"
            )
        else:
            why = (
                f"the shortfall ({100 * gap:.1f} %) exceeds plain vLLM's round-to-round spread "
                f"({'n/a, one round' if spread is None else f'{100 * spread:.0f} %'}); with one "
                f"round (quick) or a busy machine this is not conclusive"
            )
        out += [
            "",
            f"jlserve/vLLM throughput ratio per concurrency: "
            f"{', '.join(f'{r:.3f}' for r in ratios)}; the target (>= 0.97 at every level) is "
            f"{verdict}: {why}.",
        ]
    if "vllm-lora_over_vllm" in doc["summary"][0]:
        lora = [r["vllm-lora_over_vllm"]["tok_per_s"] for r in doc["summary"]]
        jl_over_lora = [
            r["jlserve"]["tok_per_s"] / r["vllm-lora"]["tok_per_s"] for r in doc["summary"]
        ]
        out.append(
            f"vLLM with runtime LoRA adapters reaches {', '.join(f'{r:.2f}' for r in lora)} of "
            f"plain vLLM's throughput (jlserve / LoRA: {', '.join(f'{r:.2f}' for r in jl_over_lora)}): "
            f"on CPU vLLM applies the adapters with its plain-torch punica ops "
            f"(vllm/lora/ops/torch_ops) on every adapted layer at every step, on top of the base "
            f"matmul, and every request must carry a task id; the merged model pays neither."
        )
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    conc = [r["concurrency"] for r in doc["summary"]]
    for s in servers:
        axes[0].plot(
            conc, [r[s]["tok_per_s"] for r in doc["summary"]], "o-", label=SERVER_LABELS[s]
        )
        axes[1].plot(conc, [1e3 * r[s]["ttft_p50_s"] for r in doc["summary"]], "o-")
        axes[2].plot(conc, [1e3 * r[s]["tpot_p50_s"] for r in doc["summary"]], "o-")
    for ax, title in zip(
        axes, ("throughput (output tok/s)", "TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True
    ):
        ax.set(xlabel="concurrent requests", title=title)
        ax.set_xticks(conc)
    axes[0].legend(fontsize=7)
    out += ["", save_figure(fig, doc, img, "serving", md_dir), ""]
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """The serving row of the targets at a glance."""
    t = doc["target"]
    if t["worst_ratio"] is None:
        return []
    return [
        f"| serving | jlserve / vLLM tok/s >= 0.97 | worst level {t['worst_ratio']:.3f} | "
        f"{'yes' if t['met'] else 'no'} |"
    ]
