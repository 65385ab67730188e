"""Section 3: the JumpLoRA training step against plain LoRA (bench/train_step.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.common import read_result
from bench.report.shared import provenance, save_figure


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    st = doc["settings"]
    out = [
        "## 3. Training step: JumpLoRA vs LoRA",
        "",
        provenance(doc),
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
    out += ["", save_figure(fig, doc, img, "train_step", md_dir), ""]
    padding = read_result("train_step_padding", doc["quick"])
    return out + (_padding(padding) if padding is not None else [])


def _padding(doc: dict[str, Any]) -> list[str]:
    """The JumpLoRA step on a right-padded batch of rows of varied length: one padded
    forward against the loop's groups of like length (bench/train_step.py --padding)."""
    st, by = doc["settings"], {r["variant"]: r for r in doc["rows"]}
    padded, grouped = by["jumplora"], by["jumplora-grouped"]
    rel = doc["ratios"]["jumplora_over_jumplora-grouped"]
    lengths = st["row_lengths"]
    return [
        "### Rows of varied length: one padded batch vs groups of like length",
        "",
        provenance(doc),
        "",
        f"The JumpLoRA step as above, on a batch of {st['batch_size']} rows of "
        f"{min(lengths)}-{max(lengths)} tokens ({sum(lengths)} real tokens of "
        f"{len(lengths) * max(lengths)} padded), right-padded as the trainer pads: one "
        f"forward of the padded batch against the loop's CPU path, the rows in groups of "
        f"like length, each cut to its longest row (`trainer.step.grouped_loss`: the same "
        f"loss and gradient).",
        "",
        "| step | wall s/step (median) | CPU s/step (median) | peak RSS MiB |",
        "|---|---|---|---|",
        f"| one padded batch | {padded['s_per_step_median']:.3f} | "
        f"{padded['cpu_s_per_step_median']:.3f} | {padded['peak_rss_mib']:.0f} |",
        f"| groups of like length | {grouped['s_per_step_median']:.3f} | "
        f"{grouped['cpu_s_per_step_median']:.3f} | {grouped['peak_rss_mib']:.0f} |",
        "",
        f"- Padded over grouped: wall **{rel['step_time']:.2f}x** (median of per-round "
        f"ratios {rel['step_time_per_round_median']:.2f}), CPU {rel['cpu_time']:.2f}x, peak "
        f"RSS {rel['peak_rss']:.2f}x.",
        "",
    ]


def summary(doc: dict[str, Any]) -> list[str]:
    """The training row of the targets at a glance."""
    t = doc["target"]
    if t["ratio"] is None:
        return []
    return [
        f"| training | JumpLoRA / LoRA step time <= {t['max_ratio']} | wall {t['ratio']:.2f}, CPU "
        f"{t['cpu_ratio']:.2f} | "
        f"{'yes' if t['met'] else 'no'} |"
    ]
