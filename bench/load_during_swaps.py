"""Load during swaps: 32 concurrent clients on `jlserve serve` while deltas are applied
every few seconds and sometimes rolled back. Bounded in time and request count, loopback.

Two phases on one server, each `--duration` seconds: without swaps (the baseline), then
with a swap every `--swap-every` seconds (every third one a rollback of the last delta).
Clients mix the four request kinds: completions and chat, streaming and not (greedy,
fixed length). Reported: requests sent / completed / failed (target: 0 failed), latency
p50/p99 per phase and for the requests that overlapped a swap, and whether every
response's `x-jlserve-model-version` header names a version that was served at some
moment between the request's start and its response headers (the version history is
recorded from the swap calls' start and end times).

    python -m bench.load_during_swaps --quick           # tiny random model, ~1 min
    python -m bench.load_during_swaps --duration 30     # SmolLM2 (models/smollm2)

Writes bench/results/load_during_swaps[_quick].{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    LOGS,
    add_common_args,
    jlserve_server,
    machine_line,
    percentile,
    require_model,
    sparse_update,
    target_names,
    write_result,
)
from jlserve.checkpoint import load_tensors
from jlserve.delta import diff_tensors

NAME = "load_during_swaps"
KINDS = ("completion", "completion-stream", "chat", "chat-stream")
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 120.0
MAX_REQUESTS = 20_000  # per phase: the bound if the server is much faster than expected
VERSION_HEADER = "x-jlserve-model-version"


@dataclass
class Record:
    kind: str
    phase: str
    start: float  # seconds since the run began
    headers_at: float  # when the response headers arrived
    end: float
    status: int | None
    version: int | None
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass
class Swap:
    operation: str  # apply | rollback
    from_version: int
    to_version: int
    start: float
    end: float
    status: int
    server_s: float | None  # the server's total_s


def build_deltas(model: Path, out: Path, count: int, density: float) -> list[Path]:
    """A chain of `count` deltas on `model`, each changing `density` of a few q/v matrices."""
    state = load_tensors(model)
    names = target_names(state, "qv")
    paths = []
    for version in range(1, count + 1):
        touched = names[(version - 1) * 2 % len(names) :][:2]
        child = dict(state) | sparse_update(state, touched, density, seed=version)
        path = out / f"v{version}.safetensors"
        path.write_bytes(diff_tensors(state, child, task=f"t{version}", version=version).to_bytes())
        paths.append(path)
        state = child
    return paths


def request_body(kind: str, model: str, i: int) -> tuple[str, dict[str, Any]]:
    prompt = f"Request {i}: tell me about the world of music and"
    common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if kind.startswith("chat"):
        body = common | {"messages": [{"role": "user", "content": prompt}]}
        return "/v1/chat/completions", body | {"stream": kind.endswith("stream")}
    return "/v1/completions", common | {"prompt": prompt, "stream": kind.endswith("stream")}


async def one_request(
    http: httpx.AsyncClient, kind: str, model: str, i: int, phase: str, t0: float
) -> Record:
    path, body = request_body(kind, model, i)
    start = time.perf_counter() - t0
    headers_at = start
    status = version = None
    try:
        async with http.stream("POST", path, json=body) as r:
            headers_at = time.perf_counter() - t0
            status = r.status_code
            version = int(r.headers.get(VERSION_HEADER, "-1"))
            text = (await r.aread()).decode()
        error = None if status == 200 else f"HTTP {status}: {text[:200]}"
        if error is None and body["stream"] and "data: [DONE]" not in text:
            error = "stream ended without [DONE]"
    except (httpx.HTTPError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Record(kind, phase, start, headers_at, time.perf_counter() - t0, status, version, error)


async def client_loop(
    http: httpx.AsyncClient,
    client: int,
    model: str,
    phase: str,
    t0: float,
    stop_at: float,
    budget: list[int],
    records: list[Record],
) -> None:
    """One client: back-to-back requests of its kinds until the phase ends or the shared
    request budget is spent."""
    i = 0
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        kind = KINDS[(client + i) % len(KINDS)]
        records.append(await one_request(http, kind, model, client * 100_000 + i, phase, t0))
        i += 1


async def swapper(
    http: httpx.AsyncClient, deltas: list[Path], every_s: float, t0: float, stop_at: float
) -> list[Swap]:
    """Apply the next delta every `every_s`; every third swap rolls the last one back."""
    swaps: list[Swap] = []
    chain = [0]  # the server's version numbers of the served chain (it never reuses one)
    n = 0
    while time.perf_counter() + every_s < stop_at:
        await asyncio.sleep(every_s)
        n += 1
        depth = len(chain) - 1  # deltas applied
        rollback = (n % 3 == 0 and depth > 0) or depth == len(deltas)
        start = time.perf_counter() - t0
        if rollback:
            r = await http.post("/admin/rollback", json={"to_version": chain[-2]})
        else:
            r = await http.post("/admin/deltas", content=deltas[depth].read_bytes())
        end = time.perf_counter() - t0
        ok = r.status_code == 200
        target = r.json()["version"] if ok else chain[-1]
        server_s = r.json()["timings"]["total_s"] if ok else None
        swaps.append(
            Swap(
                "rollback" if rollback else "apply",
                chain[-1],
                target,
                start,
                end,
                r.status_code,
                server_s,
            )
        )
        if ok:
            chain = chain[:-1] if rollback else [*chain, target]
    return swaps


def served_between(swaps: list[Swap], start: float, end: float) -> set[int]:
    """Versions served at some moment in [start, end]: a swap counts as both of its
    versions from when it was requested until it answered."""
    versions = set()
    current = 0
    for swap in swaps:
        if swap.status != 200:
            continue
        if swap.end < start:
            current = swap.to_version
        elif swap.start <= end:
            versions |= {swap.from_version, swap.to_version}
    return versions | {current}


async def run_phase(
    url: str, model: str, phase: str, clients: int, duration_s: float, t0: float, swap_args: Any
) -> tuple[list[Record], list[Swap]]:
    records: list[Record] = []
    budget = [MAX_REQUESTS]
    stop_at = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=clients + 4)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        loops = [
            client_loop(http, c, model, phase, t0, stop_at, budget, records) for c in range(clients)
        ]
        swap_task = swapper(http, *swap_args, t0, stop_at) if swap_args else None
        results = await asyncio.gather(*loops, *([swap_task] if swap_task else []))
    return records, (results[-1] if swap_task else [])


def latency(records: list[Record]) -> dict[str, float | int]:
    ok = [r.latency_s for r in records if r.error is None]
    return {"n": len(ok), "p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99)}


def summarize(records: list[Record], swaps: list[Swap]) -> dict[str, Any]:
    failed = [r for r in records if r.error is not None]
    mismatched = [
        r
        for r in records
        if r.error is None and r.version not in served_between(swaps, r.start, r.headers_at)
    ]
    during = [r for r in records if r.phase == "swaps" and _overlaps_swap(r, swaps)]
    return {
        "sent": len(records),
        "completed": len(records) - len(failed),
        "failed": len(failed),
        "failures": [asdict(r) for r in failed[:5]],
        "by_kind": {k: sum(r.kind == k for r in records) for k in KINDS},
        "latency_without_swaps": latency([r for r in records if r.phase == "baseline"]),
        "latency_with_swaps": latency([r for r in records if r.phase == "swaps"]),
        "latency_overlapping_a_swap": latency(during),
        "version_headers_checked": len(records) - len(failed),
        "version_mismatches": len(mismatched),
        "mismatch_examples": [asdict(r) for r in mismatched[:5]],
        "versions_seen": sorted({r.version for r in records if r.version is not None}),
    }


def _overlaps_swap(record: Record, swaps: list[Swap]) -> bool:
    return any(s.start <= record.end and record.start <= s.end for s in swaps)


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    swaps = doc["swaps"]
    ok = [x for x in swaps if x["status"] == 200]
    server = [x["server_s"] for x in ok]
    lines = [
        f"# Load during swaps ({'quick, tiny model' if doc['quick'] else doc['model']})",
        "",
        f"{doc['created']} | {machine_line(doc['machine'])}",
        "",
        f"{doc['clients']} clients (mixed {', '.join(KINDS)}; {MAX_TOKENS} tokens, greedy), "
        f"{doc['duration_s']:.0f} s without swaps then {doc['duration_s']:.0f} s with a swap "
        f"every {doc['swap_every_s']} s.",
        "",
        "| | value |",
        "|---|---|",
        f"| requests sent | {s['sent']} |",
        f"| completed | {s['completed']} |",
        f"| failed | {s['failed']} |",
        f"| swaps (apply / rollback), all 200 | {sum(x['operation'] == 'apply' for x in ok)} / "
        f"{sum(x['operation'] == 'rollback' for x in ok)}, {len(ok) == len(swaps)} |",
        f"| server swap time p50 / max | {percentile(server, 50):.3f} s / "
        f"{max(server, default=float('nan')):.3f} s |",
    ]
    for key, label in (
        ("latency_without_swaps", "latency without swaps"),
        ("latency_with_swaps", "latency with swaps"),
        ("latency_overlapping_a_swap", "latency of requests overlapping a swap"),
    ):
        lat = s[key]
        lines.append(
            f"| {label} p50 / p99 (n={lat['n']}) | {lat['p50_s']:.3f} s / {lat['p99_s']:.3f} s |"
        )
    lines += [
        f"| version headers matching the history | "
        f"{s['version_headers_checked'] - s['version_mismatches']} / "
        f"{s['version_headers_checked']} |",
        f"| versions seen | {s['versions_seen']} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--duration", type=float, help="seconds per phase (default 60; quick 20)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--swap-every", type=float, default=3.0, help="seconds between swaps")
    parser.add_argument("--deltas", type=int, default=6, help="length of the delta chain")
    args = parser.parse_args()
    duration = args.duration or (20.0 if args.quick else 60.0)
    with tempfile.TemporaryDirectory(prefix="jlserve-load-") as tmp:
        work = Path(tmp)
        if args.quick:
            from jlserve.models.tiny import build_tiny_llama

            model = build_tiny_llama(work / "tiny")
        else:
            model = args.model.resolve()
            require_model(model)
        deltas = build_deltas(model, work, args.deltas, density=0.01)
        server = jlserve_server(model, work / "state", LOGS / f"{NAME}.log")
        try:
            server.start()
            startup_s = server.wait_first_completion()
            t0 = time.perf_counter()
            baseline, _ = asyncio.run(
                run_phase(
                    server.url, server.model_name, "baseline", args.clients, duration, t0, None
                )
            )
            loaded, swaps = asyncio.run(
                run_phase(
                    server.url,
                    server.model_name,
                    "swaps",
                    args.clients,
                    duration,
                    t0,
                    (deltas, args.swap_every),
                )
            )
        finally:
            server.stop()
    records = baseline + loaded
    doc = {
        "model": "tiny random Llama" if args.quick else str(args.model),
        "clients": args.clients,
        "duration_s": duration,
        "swap_every_s": args.swap_every,
        "startup_s": startup_s,
        "summary": summarize(records, swaps),
        "swaps": [asdict(s) for s in swaps],
    }
    path = write_result(NAME, args.quick, doc)
    saved = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(saved))
    print(markdown(saved))


if __name__ == "__main__":
    main()
