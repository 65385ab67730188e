"""CL quality and speed benchmark: the continual-learning methods with and without the
JumpLoRA gate on one task order. Per variant: OA, BWT, FWT, the base row and the gain over
it, per-task and per-block delta density (min / median / max), train s/step, peak RSS.

    .venv/bin/python -m bench.cl_quality                      # SmolLM2-135M, short_order_1
    .venv/bin/python -m bench.cl_quality --variants incLoRA+jump incLoRA+topk --order short_order_2
    .venv/bin/python -m bench.cl_quality --tag l0-5 --set adapter.l0_weight=5 --variants incLoRA+jump
    .venv/bin/python -m bench.cl_quality --quick                 # tiny random model, smoke test

Resumable: each variant's row is kept in bench/results/cl_quality/<tag>/<variant>.json and
not run again (`--force` re-runs); a variant stopped half-way resumes from its last
finished task (its run directory under runs/bench/cl_quality/<tag>/, `jlserve train
--resume`). The summary bench/results/cl_quality[_quick].json and .md holds every row of
the default tag found on disk. Each variant runs in its own process (`python -m trainer`),
so peak RSS is per variant. Default budget (issue 10): 128 train rows and 200 dev rows per
task, max length 256, batch 8, 1 epoch, r 8, lr 1e-3. The tasks are read from --data,
default <checkout>/data/cl_benchmark (`jlserve data cl-benchmark`, docs/data.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    ENGINE_ARGS,
    RESULTS,
    RUNS_ROOT,
    Server,
    jlserve_server,
    machine_info,
    rows_machine_lines,
    running,
    write_summary_files,
)
from trainer.config import default_data_root, load_config
from trainer.errors import TrainerError

REPO = Path(__file__).resolve().parents[1]
RUNS = RUNS_ROOT / "cl_quality"
# beside the result sets' folders (runs/bench/cl_quality/eval-cache/), one for all of them:
# an entry's key holds the model's weights, the rows and the evaluator, so the ablations of
# a seed share its base row; the evaluating server's settings, which the key cannot see,
# are this file's alone
EVAL_CACHE = "eval-cache"

# name -> (method, adapter settings)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "incLoRA": ("incLoRA", {"gate": "none"}),
    "incLoRA+jump": ("incLoRA", {"gate": "jump"}),
    "incLoRA+topk": ("incLoRA", {"gate": "topk"}),
    # top-k at the learned gate's density (MATCHED_DENSITY): the fixed-ratio rival at par
    "incLoRA+topk@jump": ("incLoRA", {"gate": "topk"}),
    # the authors' own threshold training, a named preset (docs/method.md)
    "incLoRA+jump-ref": ("incLoRA", {"gate": "jump", "threshold_training": "reference"}),
    "ella": ("ella", {"gate": "none"}),
    "ella+jump": ("ella", {"gate": "jump"}),
    "seqLoRA": ("seqLoRA", {"gate": "none"}),
    "olora": ("olora", {"gate": "none"}),
    "inflora": ("inflora", {"gate": "none"}),
    "inflora+jump": ("inflora", {"gate": "jump"}),
}
# A matched-density top-k -> the learned-gate variant whose mean delta density it keeps,
# read from that variant's row in the same result set (so that one runs first).
MATCHED_DENSITY = {"incLoRA+topk@jump": "incLoRA+jump"}


def variant_adapter(name: str, rows_dir: Path, settings: dict) -> dict[str, Any]:
    """The adapter settings of variant `name`; a matched-density top-k gets the mean density
    its twin measured in rows_dir with the same settings."""
    adapter = VARIANTS[name][1]
    twin = MATCHED_DENSITY.get(name)
    if twin is None:
        return adapter
    path = rows_dir / f"{twin}.json"
    if not path.is_file():
        raise SystemExit(f"{name} keeps {twin}'s measured density: run {twin} first ({path})")
    twin_row = json.loads(path.read_text())
    if twin_row.get("settings") != settings:
        diff = settings_difference(twin_row.get("settings"), settings)
        raise SystemExit(f"{name}: {twin}'s row {path} was run with other settings ({diff})")
    return {**adapter, "topk_density": twin_row["mean_density"]}


def variant_config(name: str, base_cfg: dict, adapter: dict[str, Any]) -> dict:
    """The trainer config of variant `name` with its adapter settings."""
    return {
        **base_cfg,
        "method": {"name": VARIANTS[name][0]},
        "adapter": {**base_cfg["adapter"], **adapter},
    }


def check_configs(names: list[str], base_cfg: dict, overrides: list[str]) -> None:
    """Every variant's config with the overrides, validated before anything trains: a
    setting a variant refuses (e.g. a preset's constant) stops the run now, not hours in."""
    for name in names:
        try:
            load_config(None, overrides, start=variant_config(name, base_cfg, VARIANTS[name][1]))
        except TrainerError as exc:
            raise SystemExit(f"{name}: {exc}") from None


def row_of(name: str, metrics: dict) -> dict:
    tasks = metrics["tasks"]
    acc = metrics["accuracy"]
    summary = metrics.get("density_summary", {})
    return {
        "variant": name,
        "OA": acc["OA"],
        "OA_prefix": acc["OA_prefix"],
        "BWT": acc["BWT"],
        "FWT": acc.get("FWT"),
        "base_OA": acc.get("base_OA"),
        "gain_over_base": acc.get("gain_over_base"),
        "final_density": tasks[-1]["delta_density"],
        "mean_density": sum(t["delta_density"] for t in tasks) / len(tasks),
        "task_density": summary.get("task"),
        "block_density": summary.get("block"),
        "log_thresholds": [t.get("log_threshold") for t in tasks],
        "s_per_step": sum(t["train_seconds"] for t in tasks) / sum(t["steps"] for t in tasks),
        "train_s": sum(t["train_seconds"] for t in tasks),
        # the rows after each task (not the base row), in process or through the server
        "eval_s": sum(t["eval_seconds"] for t in tasks)
        if all("eval_seconds" in t for t in tasks)
        else None,
        # of those rows' entries, how many were read from the eval cache
        "eval_cached": sum(t.get("eval_cached", 0) for t in tasks),
        "peak_rss_mib": max(t["peak_rss_mib"] for t in tasks),
        "peak_gpu_mib": max(
            (t["peak_gpu_mib"] for t in tasks if "peak_gpu_mib" in t), default=None
        ),
        "accuracy_matrix": acc["matrix"],
        "base_row": acc.get("base"),
    }


def run_variant(
    name: str, base_cfg: dict, overrides: list[str], run_dir: Path, eval_engine: str,
    adapter: dict[str, Any],
) -> dict:  # fmt: skip
    """Train one variant with its adapter settings (resuming a half-finished run) and
    return its row. eval_engine vllm: the variant publishes each task's delta to its own
    `jlserve serve` (fp32, state dir beside the run, so a resumed variant finds its server
    at the run's last version) and evaluates through it (`--publish` + `--eval-via`)."""
    cfg = variant_config(name, base_cfg, adapter)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "trainer", "--config", str(cfg_path), "--out", str(run_dir)]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    cmd += ["--eval-cache", str(run_dir.parent.parent / EVAL_CACHE)]
    if (run_dir / "run.json").is_file():
        cmd.append("--resume")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with contextlib.ExitStack() as stack:
        if eval_engine == "vllm":
            server = eval_server(Path(cfg["model"]), server_folder(run_dir))
            stack.enter_context(running(server))
            cmd += ["--publish", server.url, "--eval-via", server.url]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if not _run_trainer(cmd, env):
            # A partial run from older code whose config defaults have changed since: it
            # cannot be resumed, so it is kept aside and the variant starts over (its
            # server's versions too, which this server already serves: by hand then; a
            # run started over empties its server's folder).
            if eval_engine == "vllm":
                raise SystemExit(
                    f"{run_dir}: the config changed since this partial run; move it aside "
                    "to start the variant over"
                )
            stale = run_dir.with_name(f"{run_dir.name}.stale-{dt.datetime.now():%Y%m%d-%H%M%S}")
            run_dir.rename(stale)
            print(f"== {name}: the config changed since the partial run; moved to {stale}")
            cmd.remove("--resume")
            _run_trainer(cmd, env)
    return row_of(name, json.loads((run_dir / "metrics.json").read_text()))


def eval_server(model: Path, server_dir: Path) -> Server:
    """The variant's evaluating `jlserve serve` (fp32; state and log in `server_dir`), its
    vLLM CPU worker bound to every logical CPU this process may use (`eval_server_cpus`).
    The trainer waits while the server generates (one evaluation at a time), so vLLM's x86
    default, which keeps a core for its scheduler, left one of 2 vCPUs idle here (measured
    on 2 vCPUs only, not on SMT or multi-NUMA hosts). A GPU server ignores the setting."""
    return jlserve_server(
        model, server_dir / "state", server_dir / "server.log",
        engine_args=(*ENGINE_ARGS, "--dtype", "float32"),
        env={"VLLM_CPU_OMP_THREADS_BIND": eval_server_cpus()},
    )  # fmt: skip


def eval_server_cpus() -> str:
    """Every logical CPU this process may use, as vLLM's CPU list (e.g. "0,1")."""
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))


def server_folder(run_dir: Path) -> Path:
    """The variant's server folder, beside its run: kept when the run resumes (the server
    comes back at the run's last version), emptied when it starts (after --force, or a run
    folder removed by hand), since a server replays the versions in its state and the run
    must find the base model served."""
    server_dir = run_dir.parent / f"{run_dir.name}-server"
    if not (run_dir / "run.json").is_file() and server_dir.exists():
        shutil.rmtree(server_dir)  # a folder that cannot go must stop the run, not be replayed
    server_dir.mkdir(exist_ok=True)
    return server_dir


def _run_trainer(cmd: list[str], env: dict[str, str]) -> bool:
    """Run the trainer, its output passed through. False: it refused `--resume` because
    the run's config differs; any other failure stops the benchmark."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    refused = False
    for line in proc.stderr or ():
        sys.stderr.write(line)
        refused |= "--resume needs the same config" in line
    code = proc.wait()
    if code != 0 and refused and "--resume" in cmd:
        return False
    if code != 0:
        raise SystemExit(f"the trainer failed with exit code {code} (see above): {cmd}")
    return True


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _range(spread: dict | None) -> str:
    if not spread:
        return "-"
    return f"{100 * spread['min']:.2f} / {100 * spread['median']:.2f} / {100 * spread['max']:.2f}"


def quality_table(rows: list[dict]) -> list[str]:
    """The per-variant markdown table, shared by this script's report and docs/benchmarks.md."""
    lines = [
        "| variant | OA % | BWT | FWT | base OA % | gain over base | density per task % (min / median / max) | per block % (min / median / max) | s/step | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {_pct(r['OA'])} | {_pct(r['BWT'], True)} | "
            f"{_pct(r.get('FWT'), True)} | {_pct(r.get('base_OA'))} | "
            f"{_pct(r.get('gain_over_base'), True)} | {_range(r.get('task_density'))} | "
            f"{_range(r.get('block_density'))} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"# CL quality benchmark ({result['created']})",
        "",
        f"Model `{result['model']}`, order {result['order']}, {result['settings']}",
        "",
        *quality_table(result["rows"]),
    ]
    lines += [
        "",
        "s/step is each variant's own run, under whatever load the machine had then (see "
        "load_average in its row): compare step times with bench/train_step.py, which rotates "
        "the variants in one process.",
    ]
    lines += ["", *rows_machine_lines(result["rows"], result["machine"]), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2")
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--order", default="short_order_1")
    parser.add_argument("--train-rows", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tag", help="result set name (default: the order, or 'quick')")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override"
    )
    parser.add_argument(
        "--eval-schedule",
        choices=["full", "needed"],
        default="full",
        help="train.eval_schedule: the whole accuracy matrix, or only what OA/BWT/FWT read",
    )
    parser.add_argument(
        "--eval-engine",
        choices=["in_process", "vllm"],
        default="in_process",
        help="greedy evaluation in the trainer (transformers) or through a jlserve server "
        "per variant (vLLM; bench/eval_engine.py compares the two)",
    )
    parser.add_argument("--force", action="store_true", help="re-run finished variants")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 tasks, few rows")
    args = parser.parse_args()

    tag = args.tag or ("quick" if args.quick else args.order)
    rows_dir = RESULTS / "cl_quality" / tag
    runs_dir = RUNS / tag
    data = {
        "root": str(args.data.resolve()),  # a link records the folder it names
        "order": args.order,
        "train_rows": args.train_rows,
        "eval_rows": args.eval_rows,
        "max_length": args.max_length,
    }
    model = args.model
    if args.quick:
        from jlserve.models.tiny import build_tiny_llama

        model = runs_dir / "tiny"
        if not (model / "config.json").is_file():
            build_tiny_llama(model)
        data = {**data, "order": None, "tasks": ["cb", "copa"], "train_rows": 16}
        data.update(eval_rows=8, max_length=96)
    elif not (model / "config.json").is_file():
        print(f"no model at {model}: run `jlserve model prepare smollm2 --out {model}`")
        return 2
    base_cfg = {
        "model": str(model),
        "data": data,
        "adapter": {"r": args.r, "alpha": 4 * args.r},
        "train": {"lr": args.lr, "batch_size": 4 if args.quick else args.batch_size, "epochs": 1},
    }
    if args.eval_schedule != "full":  # (rows saved before the option have the full matrix)
        base_cfg["train"]["eval_schedule"] = args.eval_schedule
    settings = {**{k: v for k, v in base_cfg.items() if k != "model"}, "overrides": args.set}
    if args.eval_engine != "in_process":
        settings["eval_engine"] = args.eval_engine
    names = sorted(set(args.variants), key=list(VARIANTS).index)  # a twin before its match
    check_configs(names, base_cfg, args.set)
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.force:  # what re-runs are for (new code) must not be read back from the cache
        shutil.rmtree(runs_dir.parent / EVAL_CACHE, ignore_errors=True)
    write_summary(args, tag, model, settings)  # what is already on disk
    for name in names:
        row_path = rows_dir / f"{name}.json"
        if row_path.is_file() and not args.force:
            saved = json.loads(row_path.read_text())
            stale = None
            if saved.get("settings") != settings:
                diff = settings_difference(saved.get("settings"), settings)
                stale = f"was run with other settings ({diff}); use another --tag, or"
            elif saved.get("topk_density") != (
                density := variant_adapter(name, rows_dir, settings).get("topk_density")
            ):
                stale = (
                    f"kept density {saved.get('topk_density')}, its twin now measures {density};"
                )
            if stale:
                print(f"== {name}: the saved row {row_path} {stale} --force to re-run it",
                      file=sys.stderr)  # fmt: skip
                return 2
            print(f"== {name}: kept ({row_path})", flush=True)
            continue
        run_dir = runs_dir / name.replace("+", "_")
        if args.force and run_dir.exists():
            shutil.rmtree(run_dir)
        adapter = variant_adapter(name, rows_dir, settings)
        fresh, start = not (run_dir / "run.json").is_file(), time.perf_counter()
        row = run_variant(name, base_cfg, args.set, run_dir, args.eval_engine, adapter)
        # the variant's whole time (server start, base row, training, evaluations), only
        # for one run start to end: a resumed variant's parts ran under other loads
        row["wall_s"] = time.perf_counter() - start if fresh else None
        if "topk_density" in adapter:
            row["topk_density"] = adapter["topk_density"]
        row.update(settings=settings, machine=machine_info(), load_average=os.getloadavg())
        # a record, not a setting (rows differing in it are not refused); only for a CPU
        # server and a variant run start to end (a resumed one's earlier servers, and the
        # eval cache's entries, may have run on one core)
        if args.eval_engine == "vllm" and fresh and "gpu" not in row["machine"]:
            row["eval_server_cpus"] = eval_server_cpus()
        row["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        row_path.write_text(json.dumps(row, indent=2))
        write_summary(args, tag, model, settings)  # after every variant: a long run is readable
    return 0


def settings_difference(saved: dict | None, current: dict) -> str:
    """The keys whose values differ, as 'key: saved -> current' (nested keys dotted)."""
    from trainer.append import flat

    if not isinstance(saved, dict):
        return "no settings recorded"
    old, new = flat(saved), flat(current)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def write_summary(args: argparse.Namespace, tag: str, model: Path, settings: dict) -> None:
    """bench/results/cl_quality_<tag>.json and .md from every finished variant of the tag."""
    rows_dir = RESULTS / "cl_quality" / tag
    rows = [
        json.loads((rows_dir / f"{name}.json").read_text())
        for name in VARIANTS
        if (rows_dir / f"{name}.json").is_file()
    ]
    if not rows:
        return
    result = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": "tiny random Llama (quick)" if args.quick else str(model),
        "order": "cb, copa (quick)" if args.quick else args.order,
        "tag": tag,
        "settings": json.dumps(settings),
        "machine": machine_info(),
        "rows": rows,
    }
    write_summary_files("cl_quality_quick" if args.quick else f"cl_quality_{tag}", result, markdown)


if __name__ == "__main__":
    sys.exit(main())
