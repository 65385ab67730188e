"""The product in one command: a server that keeps learning while it serves.

    make demo            # = python -m trainer.demo   (about 5-10 minutes on 2 CPU cores)
    make demo-quick      # = python -m trainer.demo --quick   (about 2-3 minutes)
    python -m trainer.demo --data data/cl_benchmark --tasks agnews yelp

1. Builds a small task stream from data pip brings (BBC news topics, movie-review and
   tweet sentiment; see trainer/demo_data.py), or reads `--data` in the CL benchmark layout.
2. Starts `jlserve serve` on SmolLM2-135M (version 0).
3. Trains the stream with JumpLoRA + IncLoRA on chat-formatted examples (the model's chat
   template; `data.prompt_format: chat`). After each task the sparse delta is published
   to the running server (hot-swap, no restart), and every task seen so far is asked
   through the server's /v1/chat/completions as a plain user message, with no task id:
   the accuracy matrix is what a chat client actually gets.
4. Prints, as it goes, accuracy by task and version, swap times and delta density; then
   asks one question per task the way a chat client does, and ends with the paths of
   the report and plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jlserve.errors import JlserveError
from jlserve.local_server import LocalServer
from trainer.config import AdapterConfig, DataConfig, MethodConfig, RunConfig, TrainConfig
from trainer.demo_data import DEMO_ORDER, build_demo_benchmark
from trainer.errors import TrainerError
from trainer.publish import ServerPublisher
from trainer.served import ServedModel

REPO = Path(__file__).resolve().parents[1]
MARKER = ".jlserve-demo"  # only directories holding it are cleared on a re-run
# The trainer evaluates in fp32 on CPU; the server computes in fp32 too, so served and
# in-process accuracy agree (the weights are the checkpoint's bf16 values either way).
ENGINE_ARGS = ("--max-model-len", "512", "--dtype", "float32", "--max-num-seqs", "32")

# rows per task, dev rows per task, max tokens (about 30 of them the chat template's system
# prompt and turn markers), number of tasks
BUDGETS = {
    "full": {"train_rows": 64, "eval_rows": 40, "max_length": 176, "tasks": 3},
    "quick": {"train_rows": 32, "eval_rows": 16, "max_length": 160, "tasks": 2},
}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def progress_table(metrics: dict, tasks: list[str]) -> Table:
    """Accuracy (as served) of each task after each version, with swap time and density."""
    done = len(metrics["tasks"])
    table = Table(title=f"served accuracy after {done}/{len(tasks)} tasks (exact match)")
    table.add_column("task")
    for v in range(1, done + 1):
        table.add_column(f"v{v}", justify="right")
    exact = metrics["accuracy"]["matrix"]
    for j, name in enumerate(tasks[:done]):
        cells = [f"{exact[i][j]:.2f}" if j <= i else "" for i in range(done)]
        table.add_row(name, *cells)
    table.add_section()
    logs = metrics["tasks"]
    table.add_row("swap s", *[_seconds(log.get("swap_s")) for log in logs])
    table.add_row("density", *[f"{log['delta_density']:.2%}" for log in logs])
    return table


def build_config(args: argparse.Namespace, data_root: Path, tasks: list[str]) -> RunConfig:
    budget = BUDGETS["quick" if args.quick else "full"]
    return RunConfig(
        model=args.model,
        data=DataConfig(
            root=data_root,
            order=None,
            tasks=tasks,
            train_rows=budget["train_rows"],
            eval_rows=budget["eval_rows"],
            max_length=budget["max_length"],
            prompt_format="chat",
        ),
        adapter=AdapterConfig(gate="jump"),
        method=MethodConfig(name="incLoRA"),
        train=TrainConfig(lr=1e-3, batch_size=8, precision="fp32"),
    )


def show_chats(served: ServedModel, cfg: RunConfig, console: Console, fingerprint: str) -> None:
    """One dev question per task, asked as a chat client asks it, and the served reply."""
    from transformers import AutoTokenizer

    from trainer.data import Encoder, load_stream

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    enc = Encoder(tokenizer, cfg.data.max_length, cfg.data.prompt_format)
    tasks = load_stream(cfg.data, cfg.train.seed)
    console.print("[bold]4. ask[/]: one dev question per task through /v1/chat/completions")
    for task in tasks:
        [(user, ids)] = enc.eval_chats(task)[:1]
        [reply] = served.chat(
            [(user, ids)], max_new_tokens=enc.max_target_len(task), stop_token=enc.stop,
            fingerprint=fingerprint,
        )  # fmt: skip
        text = " ".join(user.split("\nText: ", 1)[-1].split())[:70]
        console.print(f"   {task.name}: {text!r}... -> {reply!r} (label {task.dev[0]['label']!r})")


def run_demo(args: argparse.Namespace, console: Console) -> Path:
    from trainer.loop import train  # heavy imports only when the demo runs

    budget = BUDGETS["quick" if args.quick else "full"]
    if args.out.exists():
        if not (args.out / MARKER).is_file():
            raise TrainerError(
                f"{args.out}: exists and is not a demo directory; choose another --out"
            )
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    (args.out / MARKER).touch()
    if args.data is None:
        console.print("[bold]1. data[/]: building the demo task stream from pip packages")
        data_root = build_demo_benchmark(args.out / "data", cache_dir=REPO / ".cache")
        tasks = DEMO_ORDER
    else:
        data_root, tasks = args.data, args.tasks or []
        if not tasks:
            raise TrainerError("--data needs --tasks NAME [NAME ...]")
    tasks = tasks[: budget["tasks"]] if args.tasks is None else tasks
    if not (args.model / "config.json").is_file():
        raise TrainerError(f"no model at {args.model}: run `make model` first")

    console.print(
        f"[bold]2. serve[/]: jlserve serve --model {args.model} (log: {args.out / 'server.log'})"
    )
    server = LocalServer(
        args.model, args.out / "state", args.out / "server.log",
        flags=("--insecure-admin",), engine_args=ENGINE_ARGS,
    )  # fmt: skip
    try:
        server.start().wait_ready()
        console.print(f"   serving version 0 at {server.url}")
        console.print(
            f"[bold]3. learn[/]: {' -> '.join(tasks)} with JumpLoRA + IncLoRA; after each "
            "task, ask the server through /v1/chat/completions"
        )
        served = ServedModel(server.url)
        cfg = build_config(args, data_root, tasks)
        try:
            train(
                cfg,
                args.out / "run",
                command="python -m trainer.demo" + (" --quick" if args.quick else ""),
                publisher=ServerPublisher(server.url, token=None),
                served=served,
                on_task_end=lambda metrics: console.print(progress_table(metrics, tasks)),
            )
            run_info = json.loads((args.out / "run" / "run.json").read_text())
            show_chats(served, cfg, console, run_info["versions"][-1]["fingerprint"])
        finally:
            served.close()
    finally:
        server.stop()
    return args.out / "run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="2 tasks, small budget (~2-3 min)")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2")
    parser.add_argument(
        "--data", type=Path, help="a CL benchmark layout directory instead of pip data"
    )
    parser.add_argument("--tasks", nargs="+", help="task names in --data, in stream order")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    args = parser.parse_args(argv)
    console = Console()
    started = time.monotonic()
    try:
        run_dir = run_demo(args, console)
    except JlserveError as exc:
        console.print(f"[red]demo: error:[/] {exc}")
        return 2
    console.print(f"[bold]5. done[/] in {time.monotonic() - started:.0f} s")
    console.print(f"   report: {run_dir / 'report.md'}")
    for png in sorted(run_dir.glob("*.png")):
        console.print(f"   plot:   {png}")
    console.print(f"   deltas: {run_dir / 'deltas'}   merged: {run_dir / 'merged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
