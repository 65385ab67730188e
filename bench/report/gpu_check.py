"""Section 8: the pass/fail checks and key numbers of bench/gpu_check.py (no figure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.shared import ms, pct, provenance

TITLE = "8. GPU check (bench/gpu_check.py)"
MISSING = (  # (heading, what to say until it has results)
    TITLE,
    "_Not run: the one GPU lent so far (an H200, 15 minutes, 2026-12-04) had no CUDA vLLM "
    "and no registry to install it from; it ran the trainer's side instead (section 5, "
    "regime so1-x4-gpu). On a machine with one GPU and CUDA vLLM installed: "
    "`python -m bench.gpu_check` (one command, under 10 minutes; prints one JSON line)._",
)
CHECK_LABELS = {
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
        parts.append(f"swap {ms(t['swap_s'])} ms")
    return f"{t['task']} " + ", ".join(parts)


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    """bench/gpu_check.py's one JSON: its pass/fail checks and key numbers (no figure)."""
    pre = doc.get("preflight", {})
    checks = doc.get("checks", {})
    out = [
        f"## {TITLE}",
        "",
        provenance(doc),
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
        *(f"| {CHECK_LABELS.get(k, k)} | {'yes' if v else '**no**'} |" for k, v in checks.items()),
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
                pct(d["density"]) if d else "-",
                f"{d['nnz']:,}" if d else "-",
                r["apply_path"],
                ms(r["client_s"]),
                ms(r["update_to_first_completion_s"]),
                ms(r["server_timings"]["total_s"]),
                f"{f['restart_s']:.1f}" if "restart_s" in f else "-",
                {True: "yes", False: "**no**"}.get(f.get("equal"), "-"),
                "-" if diff is None else f"{diff:.3g}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    sr = doc.get("swap_vs_restart", {})
    if sr.get("restart_over_swap") is not None:
        out += [
            "",
            f"Swap to first completion {ms(sr['swap_to_first_completion_median_s'])} ms "
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
        bad = [CHECK_LABELS.get(k, k) for k, v in checks.items() if not v]
        meaning = "Failed checks: " + "; ".join(bad) + "." if bad else "No checks ran."
    out += ["", meaning, ""]
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """The GPU-check row of the targets at a glance."""
    checks = doc.get("checks", {})
    return [
        f"| GPU check ({doc.get('device', '?')}) | every check passes | "
        f"{sum(bool(v) for v in checks.values())} of {len(checks)} | "
        f"{'yes' if doc.get('passed') else 'no'} |"
    ]
