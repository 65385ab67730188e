"""Hot-swap benchmark: live update latency of `jlserve serve` against delta density, next to
an engine restart on the merged checkpoint and the memory-bandwidth floor.

    .venv/bin/python -m bench.hot_swap            # SmolLM2, 3 rounds (~6 min on 2 cores)
    .venv/bin/python -m bench.hot_swap --quick    # 1 round (~2 min)
    .venv/bin/python -m bench.hot_swap --targets linear --densities 0.05

Each round (alternating, so both sides see the same machine load):
1. restart: plain vLLM (`python -m vllm.entrypoints.openai.api_server`, same engine args)
   on the merged checkpoint, timed from process start to the first successful completion;
2. jlserve serve on the base checkpoint, then one delta per density (0.1 %, 1 %, 5 %,
   20 % of the q/v weights, random coordinates, order rotated per round), each timed
   client-side (POST /admin/deltas round trip, and until the first completion on the new
   version) and by the server's own breakdown (parse, plan, stage, wait, apply, commit).
The floor beside it: bytes changed / measured memory copy bandwidth (torch copy of 256 MiB).

Delta formats side by side: one trainer-like delta of the q/v weights (JumpLoRA merge,
about 3.5 % dense, `bench.common.trainer_like_update`) in format v1, v2 and v2 + zstd:
- offline, in this process, `--format-repeats` times in rotated order: parse
  (`parse_delta`), plan (`plan_update`: checks, new tensors, fingerprint of the result),
  apply (the new tensors into the state dict), as the server and `jlserve delta apply` do;
- live, at the end of every round: each format posted to the server as the next version,
  then rolled back, rotated; the server's own parse / plan / apply timings.
Writes bench/results/hot_swap[_quick].json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import (
    FORMATS,
    LOGS,
    PROMPT,
    add_common_args,
    jlserve_server,
    median,
    ratio,
    require_model,
    running,
    sparse_update,
    target_names,
    trainer_like_update,
    vllm_server,
    write_result,
)
from jlserve.checkpoint import TensorDigests, load_tensors, write_checkpoint
from jlserve.delta import diff_tensors, parse_delta, plan_update

DENSITIES = (0.001, 0.01, 0.05, 0.20)
TARGET_DENSITY = 0.05  # the target: update <= 1/20 of a restart at 5 %
MAX_V2_SLOWDOWN = 1.10  # the target: v2 parse + plan + apply <= 1.1 x v1


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s of a large tensor copy (read + write counted)."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / median(times)


def build_chain(
    base: dict[str, torch.Tensor], names: list[str], densities: list[float], seed: int
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Deltas v1..vN from `base` (one per density, in the given order), and the final state."""
    state = dict(base)
    chain = []
    for version, density in enumerate(densities, start=1):
        child = dict(state)
        child.update(sparse_update(state, names, density, seed=seed * 100 + version))
        delta = diff_tensors(state, child, task=f"d{density:g}", version=version)
        chain.append(
            {
                "density": density,
                "nnz": delta.nnz,
                "bytes": delta.to_bytes(),
                "changed_weight_bytes": sum(
                    c.nnz * c.dtype.itemsize for c in delta.changes.values()
                ),
            }
        )
        state = child
    return chain, state


def format_files(
    state: dict[str, torch.Tensor], names: list[str], version: int
) -> dict[str, bytes]:
    """One trainer-like delta on `state` producing `version`, in every compared format."""
    child = {**state, **trainer_like_update(state, names, seed=version)}
    delta = diff_tensors(state, child, task="trainer-like", version=version)
    return {label: delta.to_bytes(v, c) for label, (v, c) in FORMATS.items()}


def rotated(items: list[str], k: int) -> list[str]:
    return items[k % len(items) :] + items[: k % len(items)]


def offline_format_timings(
    base: dict[str, torch.Tensor], names: list[str], repeats: int
) -> dict[str, Any]:
    """Parse + plan + apply of the same delta in each format, in this process, rotated.

    Single-threaded torch: on this shared 2-core machine OpenMP spin-waits otherwise make
    each sample anything from 0.2 to 3 s, swamping the formats' difference (with one
    thread: about 60 ms, close to what the server's plan takes)."""
    files = format_files(base, names, version=1)
    digests = TensorDigests(base)
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in files}
    load = [os.getloadavg()[0]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for k in range(repeats):
        for label in rotated(list(files), k):
            t0 = time.perf_counter()
            delta = parse_delta(files[label])
            t1 = time.perf_counter()
            plan = plan_update(base, digests, delta)
            t2 = time.perf_counter()
            state = {**base, **plan.changed}
            t3 = time.perf_counter()
            if state.keys() != base.keys():
                raise RuntimeError("apply lost tensors")
            samples[label].append({"parse_s": t1 - t0, "plan_s": t2 - t1, "apply_s": t3 - t2})
    torch.set_num_threads(threads)
    load.append(os.getloadavg()[0])
    return {
        "repeats": repeats,
        "loadavg": load,
        "nnz": parse_delta(files["v1"]).nnz,
        "file_bytes": {label: len(data) for label, data in files.items()},
        **_format_summary(samples),
    }


def _format_summary(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per step and of parse + plan + apply, and each format's ratio to v1."""
    medians = {
        label: {
            **{k: median([s[k] for s in rows]) for k in ("parse_s", "plan_s", "apply_s")},
            "parse_plan_s": median([s["parse_s"] + s["plan_s"] for s in rows]),
            "total_s": median([s["parse_s"] + s["plan_s"] + s["apply_s"] for s in rows]),
        }
        for label, rows in samples.items()
    }
    over_v1 = {label: ratio(m["total_s"], medians["v1"]["total_s"]) for label, m in medians.items()}
    return {
        "samples": samples,
        "medians": medians,
        "total_over_v1": over_v1,
        "parse_plan_over_v1": {
            label: ratio(m["parse_plan_s"], medians["v1"]["parse_plan_s"])
            for label, m in medians.items()
        },
        "met": all(r <= MAX_V2_SLOWDOWN for r in over_v1.values()),
    }


def live_format_swaps(
    http: httpx.Client, files: dict[str, bytes], version: int, repeats: int, rnd: int
) -> list[dict[str, Any]]:
    """Post each format's file as `version`, then roll back to `version - 1`; rotated."""
    rows = []
    for k in range(repeats):
        for label in rotated(list(files), rnd + k):
            r = http.post("/admin/deltas", content=files[label])
            r.raise_for_status()
            rows.append({"format": label, "round": rnd, **r.json()["timings"]})
            http.post("/admin/rollback", json={"to_version": version - 1}).raise_for_status()
    return rows


def fused_bytes(base: dict[str, torch.Tensor], names: list[str]) -> int:
    """Bytes of the complete fused modules the CPU reload path rewrites for `names`
    (q,k,v together; gate,up together; o and down alone)."""
    groups = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj")}
    groups |= {"v_proj": groups["q_proj"], "gate_proj": ("gate_proj", "up_proj")}
    groups |= {"up_proj": groups["gate_proj"]}
    touched: set[str] = set()
    for name in names:
        prefix, module, _ = name.rsplit(".", 2)
        for m in groups.get(module, (module,)):
            touched.add(f"{prefix}.{m}.weight")
    return sum(base[n].numel() * base[n].element_size() for n in touched)


def swap_round(
    model: Path,
    chain: list[dict[str, Any]],
    state_dir: Path,
    log: Path,
    formats: tuple[dict[str, bytes], int, int],
) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """Start jlserve serve, apply the chain, then compare the formats (`formats`: files,
    repeats, round); returns (startup seconds, one row per delta, one per format swap)."""
    server = jlserve_server(model, state_dir, log)
    rows = []
    with running(server) as startup_s, httpx.Client(base_url=server.url, timeout=300) as http:
        for version, item in enumerate(chain, start=1):
            t0 = time.perf_counter()
            r = http.post("/admin/deltas", content=item["bytes"])
            t_update = time.perf_counter() - t0
            r.raise_for_status()
            body = r.json()
            if body["version"] != version:
                raise RuntimeError(f"expected version {version}, server says {body}")
            c = http.post(
                "/v1/completions",
                json={"model": server.model_name, "prompt": PROMPT, "max_tokens": 1},
            )
            t_first = time.perf_counter() - t0
            c.raise_for_status()
            if c.headers.get("x-jlserve-model-version") != str(version):
                raise RuntimeError(f"completion after v{version} served by {c.headers}")
            rows.append(
                {
                    "density": item["density"],
                    "nnz": item["nnz"],
                    "delta_file_bytes": len(item["bytes"]),
                    "client_update_s": t_update,
                    "update_to_first_completion_s": t_first,
                    "server_timings": body["timings"],
                    "apply_path": body["apply_path"],
                }
            )
            print(
                f"  density {item['density']:.3%}: update {t_update:.3f} s "
                f"(server total {body['timings']['total_s']:.3f}, apply "
                f"{body['timings']['apply_s']:.3f}), first completion {t_first:.3f} s",
                flush=True,
            )
        files, repeats, rnd = formats
        format_rows = live_format_swaps(http, files, len(chain) + 1, repeats, rnd)
    return startup_s, rows, format_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (quick: 1)")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--targets", choices=["qv", "linear"], default="qv")
    parser.add_argument(
        "--format-repeats", type=int, default=None, help="offline v1/v2 repeats (21; quick 9)"
    )
    args = parser.parse_args()
    require_model(args.model)
    rounds = args.rounds or (1 if args.quick else 3)
    format_repeats = args.format_repeats or (9 if args.quick else 21)

    bandwidth = copy_bandwidth()
    print(f"memory copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    base = load_tensors(args.model)
    names = target_names(base, args.targets)
    target_numel = sum(base[n].numel() for n in names)
    reload_bytes = fused_bytes(base, names)
    qv = target_names(base, "qv")  # the formats are compared on trainer-like q/v deltas
    offline = offline_format_timings(base, qv, format_repeats)
    print(
        "offline parse + plan + apply (median): "
        + ", ".join(
            f"{k} {1e3 * m['total_s']:.1f} ms ({offline['total_over_v1'][k]:.2f}x v1)"
            for k, m in offline["medians"].items()
        ),
        flush=True,
    )

    restarts: list[float] = []
    startups: list[float] = []
    swaps: list[dict[str, Any]] = []
    live_formats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-hot-swap-") as tmp:
        work = Path(tmp)
        for rnd in range(rounds):
            shift = rnd % len(args.densities)
            order = args.densities[shift:] + args.densities[:shift]
            chain, final = build_chain(base, names, order, seed=rnd)
            merged = work / f"merged-{rnd}"
            write_checkpoint(final, merged, like=args.model)
            print(f"round {rnd + 1}/{rounds}: restart of plain vLLM on the merged checkpoint")
            with running(vllm_server(merged, LOGS / "hot_swap_restart.log")) as restart_s:
                restarts.append(restart_s)
            shutil.rmtree(merged)
            print(f"  restart to first completion: {restart_s:.1f} s", flush=True)
            print(f"round {rnd + 1}/{rounds}: jlserve serve, {len(chain)} live updates")
            files = format_files(final, qv, version=len(chain) + 1)
            startup_s, rows, format_rows = swap_round(
                args.model,
                chain,
                work / f"state-{rnd}",
                LOGS / "hot_swap_jlserve.log",
                (files, 2 if args.quick else 3, rnd),
            )
            startups.append(startup_s)
            swaps += [{**row, "round": rnd} for row in rows]
            live_formats += format_rows

    restart_med = median(restarts)
    per_density = []
    for density in args.densities:
        rows = [s for s in swaps if s["density"] == density]
        timings = {
            k: median([r["server_timings"][k] for r in rows]) for k in rows[0]["server_timings"]
        }
        changed_bytes = 2 * median([r["nnz"] for r in rows])  # bf16 values written
        first = median([r["update_to_first_completion_s"] for r in rows])
        per_density.append(
            {
                "density": density,
                "nnz": int(median([r["nnz"] for r in rows])),
                "delta_file_bytes": int(median([r["delta_file_bytes"] for r in rows])),
                "client_update_s": median([r["client_update_s"] for r in rows]),
                "update_to_first_completion_s": first,
                "server_timings_median": timings,
                "floor_changed_bytes_s": changed_bytes / bandwidth,
                "floor_reload_path_s": reload_bytes / bandwidth,
                "ratio_to_restart": ratio(first, restart_med),
                "restart_over_update": ratio(restart_med, first),
            }
        )
    at_target = next((p for p in per_density if p["density"] == TARGET_DENSITY), None)
    live = _format_summary(
        {label: [r for r in live_formats if r["format"] == label] for label in FORMATS}
    )
    write_result(
        "hot_swap",
        args.quick,
        {
            "model": str(args.model),
            "targets": args.targets,
            "target_numel": target_numel,
            "rounds": rounds,
            "memory_bandwidth_bytes_per_s": bandwidth,
            "reload_path_bytes": reload_bytes,
            "restart_s": restarts,
            "restart_median_s": restart_med,
            "jlserve_startup_s": startups,
            "per_density": per_density,
            "swaps": swaps,
            "formats": {
                "target_max_v2_over_v1": MAX_V2_SLOWDOWN,
                "offline": offline,
                "live": {"loadavg_at_end": os.getloadavg()[0], **live},
            },
            "target": {
                "density": TARGET_DENSITY,
                "max_ratio_to_restart": 1 / 20,
                "ratio": at_target["ratio_to_restart"] if at_target else None,
                "met": bool(at_target and at_target["ratio_to_restart"] <= 1 / 20),
            },
        },
    )


if __name__ == "__main__":
    main()
