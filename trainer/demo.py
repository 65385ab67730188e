"""The product in one command: a server that keeps learning while it serves.

    make demo            # = python -m trainer.demo   (about 5-8 minutes on 2 CPU cores)
    make demo-quick      # = python -m trainer.demo --quick   (about 2-3 minutes)
    python -m trainer.demo --data data/cl_benchmark --tasks agnews yelp

1. Writes the tasks as a user brings them: OpenAI chat fine-tuning files built from data
   pip brings (news topics, movie-review sentiment, and a free-form task: writing an
   article's headline; see trainer/demo_data.py), or takes task folders of `--data`.
2. Starts `jlserve serve` on SmolLM2-135M (version 0).
3. Feeds the tasks to a live run one at a time, as they would arrive (`jlserve learn --out
   RUN --add-task NAME=FILE:VALIDATION`): each is trained with JumpLoRA + IncLoRA on top
   of the run's last version, its sparse delta is published to the running server
   (hot-swap, no restart), and every task seen so far is asked through the server's
   /v1/chat/completions, with no task id: the matrix is what a chat client gets, each
   task in its own metric (exact match, or ROUGE-L for the headlines).
4. Prints, as it goes, the served scores by task and version, swap times and delta density;
   then asks one question per task the way a chat client does, and ends with the paths of
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
from trainer.demo_data import build_demo_task_files
from trainer.errors import TrainerError
from trainer.publish import ServerPublisher
from trainer.served import ServedModel

REPO = Path(__file__).resolve().parents[1]
MARKER = ".jlserve-demo"  # only directories holding it are cleared on a re-run
# The trainer evaluates in fp32 on CPU; the server computes in fp32 too, so served and
# in-process accuracy agree (the weights are the checkpoint's bf16 values either way).
ENGINE_ARGS = ("--max-model-len", "512", "--dtype", "float32", "--max-num-seqs", "32")

# rows per task, held-out rows per task, max tokens (about 30 of them the chat template's
# system prompt and turn markers), number of tasks
BUDGETS = {
    "full": {"train_rows": 64, "eval_rows": 40, "max_length": 192, "tasks": 3},
    "quick": {"train_rows": 32, "eval_rows": 16, "max_length": 192, "tasks": 2},
}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def progress_table(metrics: dict) -> Table:
    """The served score of each task after each version, with swap time and density."""
    tasks, done = metrics["accuracy"]["tasks"], len(metrics["tasks"])
    table = Table(title=f"served scores after {done} task(s)")
    table.add_column("task")
    table.add_column("metric")
    for v in range(1, done + 1):
        table.add_column(f"v{v}", justify="right")
    scores, kinds = metrics["accuracy"]["matrix"], metrics["task_metrics"]
    for j, name in enumerate(tasks[:done]):
        cells = [f"{scores[i][j]:.2f}" if j <= i else "" for i in range(done)]
        table.add_row(name, "ROUGE-L" if kinds[name] == "rougeL" else "exact", *cells)
    table.add_section()
    logs = metrics["tasks"]
    table.add_row("swap s", "", *[_seconds(log.get("swap_s")) for log in logs])
    table.add_row("density", "", *[f"{log['delta_density']:.2%}" for log in logs])
    return table


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run's settings; its stream is the tasks added one by one (no data.order)."""
    budget = BUDGETS["quick" if args.quick else "full"]
    return RunConfig(
        model=args.model,
        data=DataConfig(
            order=None,
            train_rows=budget["train_rows"],
            eval_rows=budget["eval_rows"],
            max_length=budget["max_length"],
            prompt_format="chat",  # for task folders (--data); task files are chats already
        ),
        adapter=AdapterConfig(gate="jump"),
        method=MethodConfig(name="incLoRA"),
        train=TrainConfig(lr=1e-3, batch_size=8, precision="fp32"),
    )


def show_chats(served: ServedModel, cfg: RunConfig, run_dir: Path, console: Console) -> None:
    """One held-out question per task, asked as a chat client asks it, and the reply."""
    from transformers import AutoTokenizer

    from trainer.append import TASKS_DIR
    from trainer.data import Encoder, load_stream
    from trainer.freeform import reference

    info = json.loads((run_dir / "run.json").read_text())
    enc = Encoder(AutoTokenizer.from_pretrained(cfg.model), cfg.data.max_length, "chat")
    data = DataConfig(root=run_dir / TASKS_DIR, tasks=info["tasks"], max_length=cfg.data.max_length)
    console.print("[bold]4. ask[/]: one held-out question per task through /v1/chat/completions")
    for task in load_stream(data, cfg.train.seed):
        [(messages, ids)] = enc.eval_chats(task)[:1]
        [reply] = served.chat(
            [(messages, ids)], max_new_tokens=enc.max_target_len(task),
            stop_token=enc.stop_for(task), fingerprint=info["versions"][-1]["fingerprint"],
        )  # fmt: skip
        row = task.dev[0]
        expected = row["label"] if task.format == "benchmark" else reference(row)
        text = " ".join(messages[-1]["content"].split("\nText: ", 1)[-1].split())[:70]
        console.print(f"   {task.name}: {text!r}... -> {reply!r} (expected {expected!r})")


def _arrivals(args: argparse.Namespace, console: Console) -> list[str]:
    """The tasks as `--add-task NAME=PATH[:VALIDATION]` values, in arrival order."""
    budget = BUDGETS["quick" if args.quick else "full"]
    if args.data is not None:
        if not args.tasks:
            raise TrainerError("--data needs --tasks NAME [NAME ...]")
        return [f"{name}={args.data / name}" for name in args.tasks]
    console.print("[bold]1. data[/]: writing the tasks as chat fine-tuning files (JSONL)")
    files = build_demo_task_files(
        args.out / "data", cache_dir=REPO / ".cache",
        train_rows=budget["train_rows"], dev_rows=budget["eval_rows"],
    )  # fmt: skip
    names = list(files)[-budget["tasks"] :]  # quick: the sentiment and the headlines
    for name in names:
        console.print(f"   {files[name][0]} (+ {files[name][1].name} held out)")
    return [f"{name}={files[name][0]}:{files[name][1]}" for name in names]


def run_demo(args: argparse.Namespace, console: Console) -> Path:
    from trainer.append import AddedTask
    from trainer.loop import train  # heavy imports only when the demo runs

    if args.out.exists():
        if not (args.out / MARKER).is_file():
            raise TrainerError(
                f"{args.out}: exists and is not a demo directory; choose another --out"
            )
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    (args.out / MARKER).touch()
    if not (args.model / "config.json").is_file():
        raise TrainerError(f"no model at {args.model}: run `make model` first")
    arrivals = _arrivals(args, console)

    console.print(
        f"[bold]2. serve[/]: jlserve serve --model {args.model} (log: {args.out / 'server.log'})"
    )
    server = LocalServer(
        args.model, args.out / "state", args.out / "server.log",
        flags=("--insecure-admin",), engine_args=ENGINE_ARGS,
    )  # fmt: skip
    run_dir = args.out / "run"
    try:
        server.start().wait_ready()
        console.print(f"   serving version 0 at {server.url}")
        console.print(
            "[bold]3. learn[/]: the tasks arrive one at a time (jlserve learn --add-task); "
            "each is trained with JumpLoRA + IncLoRA, hot-swapped in, and every task so far "
            "asked through /v1/chat/completions"
        )
        served = ServedModel(server.url)
        cfg = build_config(args)
        try:
            for arrival in arrivals:
                console.print(f"   jlserve learn --out {run_dir} --add-task {arrival}")
                train(
                    cfg,
                    run_dir,
                    command="python -m trainer.demo" + (" --quick" if args.quick else ""),
                    publisher=ServerPublisher(server.url, token=None),
                    served=served,
                    on_task_end=lambda metrics: console.print(progress_table(metrics)),
                    added=[AddedTask.parse(arrival)],
                )
            show_chats(served, cfg, run_dir, console)
        finally:
            served.close()
    finally:
        server.stop()
    return run_dir


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
