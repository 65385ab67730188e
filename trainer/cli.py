"""`jlserve train` and `jlserve data` (registered via the `jlserve.commands` entry point), and
`python -m trainer` (= `jlserve train`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jlserve.client import resolve_token
from jlserve.errors import JlserveError
from trainer import data_cmd, worker
from trainer.config import RunConfig, add_config_arguments, load_config
from trainer.errors import TrainerError
from trainer.publish import DirectoryPublisher, Publisher, ServerPublisher
from trainer.served import ServedModel


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config file (see configs/)")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    parser.add_argument(
        "--add-task",
        dest="add_tasks",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="append a task to the run in --out (a new run: its only tasks) and train it on "
        "top of the run's last version; PATH is a task folder of a CL-layout root "
        "(repeatable; docs/trainer.md, 'Tasks arrive')",
    )
    parser.add_argument(
        "--keep-all-merged", action="store_true", help="keep every merged checkpoint"
    )
    parser.add_argument(
        "--stop-after", type=_positive_int, metavar="N", help="stop after N completed tasks"
    )
    serving = parser.add_argument_group("live serving (see docs/serving.md)")
    target = serving.add_mutually_exclusive_group()
    target.add_argument(
        "--publish", metavar="URL", help="POST each task's delta to this jlserve server"
    )
    target.add_argument(
        "--publish-dir",
        type=Path,
        metavar="DIR",
        help="write each task's delta into DIR (for `jlserve serve --watch DIR`)",
    )
    serving.add_argument(
        "--admin-token-file",
        type=Path,
        help="admin token for --publish (default: $JLSERVE_ADMIN_TOKEN_FILE / $JLSERVE_ADMIN_TOKEN)",
    )
    serving.add_argument(
        "--eval-via",
        metavar="URL",
        help="evaluate through this server's OpenAI API (it must serve the run's versions)",
    )
    serving.add_argument(
        "--eval-cache",
        type=Path,
        metavar="DIR",
        help="reuse evaluations of the same model, task rows and evaluator kept in DIR "
        "(runs on one base share the base row; one DIR per serving set-up)",
    )


def command_line(prog: str, args: argparse.Namespace) -> str:
    """The command that reproduces this run (without --resume/--stop-after)."""
    words = [*shlex.split(prog)]
    if args.config is not None:
        words += ["--config", str(args.config)]
    words += ["--out", str(args.out)]
    for assignment in args.overrides:
        words += ["--set", assignment]
    if args.keep_all_merged:
        words.append("--keep-all-merged")
    for task in args.add_tasks:
        words += ["--add-task", task]
    return shlex.join(words)


def append_config(
    out: Path, config: Path | None, overrides: list[str], keep_all_merged: bool, command: str
) -> tuple[RunConfig, dict[str, Any], str]:
    """(the run's config, the added tasks' own settings, the run's command) for tasks added
    to the run in `out` (a new run if it has none: `command` becomes its command)."""
    from trainer.append import open_stream_config, task_settings

    run_json = out / "run.json"
    if not run_json.is_file():  # a new run whose stream is the added tasks
        cfg, note = open_stream_config(load_config(config, overrides))
        if note:
            print(f"note: {note}", file=sys.stderr)
        cfg = cfg.model_copy(update={"keep_all_merged": keep_all_merged})
        return cfg, {}, command
    try:
        info = json.loads(run_json.read_text())
        raw = info["config"]
        run_cfg = RunConfig.model_validate(raw)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerError(f"{run_json}: not a readable run ({exc})") from None
    asked = load_config(config, overrides, start=None if config else raw)
    if keep_all_merged:
        asked = asked.model_copy(update={"keep_all_merged": True})
    return run_cfg, task_settings(run_cfg, asked), info.get("command", "")


def run_train(args: argparse.Namespace) -> int:
    from trainer.append import AddedTask
    from trainer.loop import train  # heavy imports only when the command runs

    added = [AddedTask.parse(text) for text in args.add_tasks]
    if added:
        if args.resume:
            raise TrainerError("--add-task continues the run by itself; drop --resume")
        cfg, settings, command = append_config(
            args.out,
            args.config,
            args.overrides,
            args.keep_all_merged,
            command_line(args.prog, args),
        )
    else:
        cfg, settings = load_config(args.config, args.overrides), {}
        command = command_line(args.prog, args)
    if args.keep_all_merged and not added:
        cfg = cfg.model_copy(update={"keep_all_merged": True})
    served = ServedModel(args.eval_via) if args.eval_via else None
    try:
        train(
            cfg,
            args.out,
            command=command,
            resume=args.resume,
            stop_after=args.stop_after,
            publisher=_publisher(args),
            served=served,
            eval_cache_dir=args.eval_cache,
            added=added,
            added_settings=settings,
        )
    finally:
        if served is not None:
            served.close()
    return 0


def _publisher(args: argparse.Namespace) -> Publisher | None:
    if args.publish:
        return ServerPublisher(args.publish, resolve_token(args.admin_token_file))
    if args.publish_dir:
        return DirectoryPublisher(args.publish_dir)
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    """The trainer's `jlserve` sub-commands: `train`, and `data` (trainer/data_cmd.py)."""
    parser = subparsers.add_parser(
        "train",
        aliases=["learn"],
        help="train a continual-learning stream, export sparse deltas per task; "
        "`learn` = train with --add-task",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_train, prog="jlserve train")
    data_cmd.register(subparsers)
    worker.register(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.prog = "python -m trainer"
    try:
        return run_train(args)
    except JlserveError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 2
