"""Section 7's swap part: the deltas posted to the fresh jlserve server, as a table and as
sentences on how the swap time follows the changed coordinates."""

from __future__ import annotations

from typing import Any

from bench.common import median
from bench.report.shared import ms, pct


def swap_table(
    doc: dict[str, Any], swaps: list[dict[str, Any]], chain_swaps: list[dict[str, Any]]
) -> list[str]:
    """One row per density of the single deltas, one for the chain, one per density of the
    in-place run; swaps, chain_swaps: the raw records of every round."""
    if not swaps and not chain_swaps:
        return []
    chain = doc["chain"]
    out = [
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
        out.append(_swap_row(pct(density), [w for w in swaps if w["density"] == density]))
    if chain_swaps:
        label = f"{pct(chain_swaps[0]['density'])} (chain)"
        out.append(_swap_row(label, chain_swaps))
    in_place = _in_place_swaps(doc)
    for density in sorted({w["density"] for w in in_place}):
        rows = [w for w in in_place if w["density"] == density]
        out.append(_swap_row(f"{pct(density)} (in place)", rows))
    return out


def swap_sentences(doc: dict[str, Any]) -> list[str]:
    """How the server's swap time grows with the density, against a plain vLLM start, and
    what the in-place path takes."""
    s = doc["startup_median_s"]
    sentences = []
    if len(doc["swaps"]) >= 2:
        lo, hi = doc["swaps"][0], doc["swaps"][-1]
        growth = hi["server_timings_median"]["total_s"] / max(
            lo["server_timings_median"]["total_s"], 1e-9
        )
        sentences.append(
            f"From {pct(lo['density'])} to {pct(hi['density'])} density "
            f"({hi['nnz'] / lo['nnz']:.0f}x the changed coordinates) the server's swap time "
            f"goes from {ms(lo['server_timings_median']['total_s'])} to "
            f"{ms(hi['server_timings_median']['total_s'])} ms ({growth:.1f}x), against "
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
    in_place = _in_place_swaps(doc)
    if in_place:
        by = {
            d: median([w["server_timings"]["total_s"] for w in in_place if w["density"] == d])
            for d in sorted({w["density"] for w in in_place})
        }
        lo_d, hi_d = min(by), max(by)
        sentences.append(
            f"On the in-place path (the GPU's; on CPU through `--cpu-dense-weights`) only the "
            f"changed positions travel, and the swap follows them: {ms(by[lo_d])} ms at "
            f"{pct(lo_d)} and {ms(by[hi_d])} ms at {pct(hi_d)}."
        )
    return sentences


def _swap_row(label: str, rows: list[dict[str, Any]]) -> str:
    """One line of the swap table from the raw swap records of one density."""
    t = {k: median([r["server_timings"][k] for r in rows]) for k in rows[0]["server_timings"]}
    paths = sorted({r.get("apply_path", "?") for r in rows})
    sent = [r["sent_bytes"] for r in rows if r.get("sent_bytes") is not None]
    sent_cell = f"{median(sent) / 2**10:,.0f}" if sent else "-"
    return (
        f"| {label} | {len(rows)} | {rows[0]['nnz']:,} | {rows[0]['changed_bytes'] / 2**10:,.0f} | "
        f"{rows[0]['delta_file_bytes'] / 2**10:,.0f} | "
        f"{ms(median([r['client_update_s'] for r in rows]))} | "
        f"{ms(median([r['update_to_first_completion_s'] for r in rows]))} | "
        f"{ms(t['total_s'])} | {ms(t['plan_s'])} | {ms(t['apply_s'])} | "
        f"{ms(t['paused_s'])} | {', '.join(paths)} | {sent_cell} |"
    )


def _in_place_swaps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The swaps of the in-place run (the GPU's path; on CPU `--cpu-dense-weights`), if any."""
    return doc.get("in_place", {}).get("swaps", [])
