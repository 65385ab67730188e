"""Section 9: vLLM's AVX-512 against its AMX attention kernel (bench/cpu_attention.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.shared import provenance

TITLE = "9. CPU attention kernel on a CPU with AMX (bench/cpu_attention.py)"
MISSING = (
    TITLE,
    "_Not run yet. On a CPU with AMX: `python -m bench.cpu_attention` (about 5 minutes)._",
)


def section(doc: dict[str, Any], img: Path, md_dir: Path) -> list[str]:
    """Both kernels' prefill times and decode rate, and the ratios (no figure)."""
    kernels, ratios = doc["kernels"], doc["ratios_default_over_amx"]
    prefills = [k.removeprefix("prefill_") for k in kernels["default"] if k.startswith("prefill_")]
    out = [
        f"## {TITLE}",
        "",
        "jlserve keeps vLLM 0.32's CPU attention off its AMX kernel, which crashed after a "
        f"weight reload on such CPUs (docs/serving.md). Two `jlserve serve` on "
        f"`{Path(doc['model']).name}` in bf16, up together, prefix cache off, requests "
        "alternated one at a time: the default (AVX-512 "
        f"attention) and `JLSERVE_CPU_AMX_ATTENTION=1` (AMX); medians of {doc['repeats']} "
        "repeats.",
        "",
        "| request | default (AVX-512) | AMX | default / AMX |",
        "|---|---|---|---|",
    ]
    for n in prefills:
        key = f"prefill_{n}"
        tokens = kernels["default"][key]["prompt_tokens"]
        out.append(
            f"| prefill, {tokens}-token prompt (s) | {kernels['default'][key]['median_s']:.3f} | "
            f"{kernels['amx'][key]['median_s']:.3f} | {ratios[f'{key}_time']:.2f} |"
        )
    out.append(
        f"| decode, {doc['decode_tokens']} tokens (tokens/s) | {kernels['default']['decode_tok_per_s']:.1f} | "
        f"{kernels['amx']['decode_tok_per_s']:.1f} | {ratios['decode_tok_per_s']:.2f} |"
    )
    load = ", ".join(f"{x:.1f}" for x in doc["load_average_end"])
    note = f"Load average at the end: {load} (it counts both servers' idle worker threads)."
    return [*out, "", note, "", provenance(doc), ""]
