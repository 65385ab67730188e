"""The continual-learning task loop, one recipe: setup, then per task train -> merge ->
evaluate -> export, then cleanup (torchtune-recipe style: read it top to bottom).

Per task i (version i+1; version 0 is the base model):
  1. method.start_task injects the adapter (fresh for IncLoRA/ELLA/O-LoRA)
  2. T optimizer steps; f from the schedule; theta re-initialised at step t1
  3. merged = W0 + s*J(dW) per adapted weight, rounded to the checkpoint dtype
  4. method.end_task commits it (or keeps the adapter: SeqLoRA)
  5. greedy exact-match evaluation on tasks 0..i+1 (train.eval_schedule), on exactly the
     exported weights
  6. delta = diff(previous state, new state) in the checkpoint dtype -> deltas/, the
     merged checkpoint -> merged/, the method state -> state/method-v<i>.safetensors;
     run.json is rewritten after them, as the commit point; only then are the previous
     merged checkpoint (unless --keep-all-merged) and method state removed.

Determinism and `--resume`: every task reseeds torch and its data order from
(seed, task index) and restarts its optimizer, and the loop's only state besides the
checkpoint is the method's (one file per version, named in run.json) and the accuracy
rows (in run.json), so a resumed run continues exactly where an uninterrupted one would
be, wherever the previous one stopped.

Several processes: under `torchrun --nproc_per_node N` each task trains under PyTorch DDP,
each rank on its share of the same global batches (trainer.parallel), so the result equals
one process's up to float summation order; rank 0 evaluates and writes, the others wait.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from jlserve import __version__ as jlserve_version
from jlserve.checkpoint import atomic_write_bytes, fingerprint, load_tensors, write_checkpoint
from jlserve.delta import SparseDelta, diff_tensors, read_delta, write_delta
from jlserve.errors import JlserveError
from trainer.adapter import Adapter
from trainer.append import AddedTask, appended_tasks, for_task, read_added, write_added
from trainer.config import RunConfig, config_yaml, same_config
from trainer.data import Encoder, Task, evaluate_task, held_out_loss, load_stream, score
from trainer.errors import OutOfSyncError, TrainerError
from trainer.evalcache import EvalCache
from trainer.methods import Method, build_method
from trainer.metrics import AccuracyMatrix, DeltaDensity, LossMatrix, SupportOverlap
from trainer.parallel import Examples, data_parallel, global_batches
from trainer.publish import Publisher
from trainer.report import write_report
from trainer.schedule import SparsitySchedule
from trainer.served import ServedModel
from trainer.step import StepResult, adapter_optimizer, grouped_loss, train_step
from trainer.telemetry import Telemetry


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def delta_name(version: int, task: str) -> str:
    return f"task{version:03d}-{_slug(task)}.safetensors"


def merged_name(version: int, task: str) -> str:
    return f"v{version:03d}-{_slug(task)}"


def state_name(version: int) -> str:
    return f"method-v{version:03d}.safetensors"


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak host memory and, on a GPU, the peak of what torch allocated
    there (host RSS alone misses the model and activations on the GPU)."""
    peaks = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        peaks["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


@dataclass(frozen=True)
class StepReport:
    """What `on_step` hears after each optimizer step (`stats`: on logged steps only)."""

    task: str
    step: int  # 1-based, within the task
    total: int
    stats: dict[str, float] | None  # loss (mean since the last log), density, theta


class Recipe:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        command: str = "",
        resume: bool = False,
        stop_after: int | None = None,
        console: Console | None = None,
        publisher: Publisher | None = None,
        served: ServedModel | None = None,
        eval_cache_dir: Path | None = None,
        on_task_end: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        added: list[AddedTask] | None = None,
        added_settings: dict[str, Any] | None = None,
        expect_fingerprint: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.command = command
        self.resume = resume
        self.stop_after = stop_after
        self.console = console or Console(stderr=True)
        self.publisher = publisher  # where each task's delta goes as soon as it is merged
        self.served = served  # evaluate through this server instead of in process
        self.eval_cache_dir = eval_cache_dir  # evaluations already done (trainer/evalcache.py)
        self.on_task_end = on_task_end  # called with the metrics after each task's commit
        self.on_step = on_step  # called after every optimizer step; may raise to stop the run
        # the model the run's last version must be (a jobs worker: the served one); checked
        # before anything is written, so a run out of step with its server is left as it was
        self.expect_fingerprint = expect_fingerprint
        self.added = added or []  # tasks to append to the stream (trainer.append)
        self.added_settings = added_settings or {}  # their own settings (PER_TASK_KEYS)

    # ------------------------------------------------------------------ setup

    @property
    def last_task(self) -> int:
        """How many tasks this call completes (all, or --stop-after)."""
        n = len(self.tasks)
        return n if self.stop_after is None else min(self.stop_after, n)

    def setup(self) -> None:
        self._check_run_dir()  # fail fast: run directory and data before the model
        path = self.run_dir / "run.json"
        info = json.loads(path.read_text()) if path.is_file() else None
        self.appended: list[dict[str, Any]] = list(info.get("appended", [])) if info else []
        data = self.cfg.data
        fixed = load_stream(data, self.cfg.train.seed) if data.order or data.tasks else []
        self.tasks: list[Task] = fixed + appended_tasks(self.run_dir, self.cfg, self.appended)
        new_tasks = []
        if self.added:
            new_tasks = read_added(self.run_dir, self.cfg, info, self.added, self.added_settings)
            self.tasks += new_tasks
            self.appended += [
                {"name": a.name, "source": str(a.path.resolve()), "settings": self.added_settings}
                for a in self.added
            ]
        if not self.tasks:
            raise TrainerError(
                "no tasks: give data.order or data.tasks, or add tasks with --add-task"
            )
        own = {a["name"]: a["settings"] for a in self.appended}
        self.task_cfgs = [for_task(self.cfg, own.get(t.name, {})) for t in self.tasks]
        self.method: Method = build_method(self.cfg, len(self.tasks))
        self._setup_distributed()
        self._setup_base()  # checks that every task, the added ones too, fits max_length
        self._setup_model()
        self.eval_cache = (
            EvalCache(self.eval_cache_dir, self.cfg.model) if self.eval_cache_dir else None
        )
        names = [t.name for t in self.tasks]
        self.accuracy = AccuracyMatrix(names)
        self.losses = LossMatrix(names)
        self.density = DeltaDensity(self.adapted_numel)
        self.overlap = SupportOverlap()
        self.completed = 0
        self.task_log: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = [
            {"version": 0, "task": None, "fingerprint": self.base_fingerprint}
        ]
        if info is not None:
            self._load_progress(info)
        last = self.versions[-1]
        if self.expect_fingerprint is not None and last["fingerprint"] != self.expect_fingerprint:
            raise OutOfSyncError(
                f"{self.run_dir}: the run's last version {last['version']} is "
                f"{last['fingerprint']}, not the expected model {self.expect_fingerprint}"
            )
        if self.is_main:
            if new_tasks:  # their rows into the run; run.json below makes them its tasks
                write_added(self.run_dir, self.appended, new_tasks)
            if info is None:
                self._init_run_dir()
            elif new_tasks:
                self._write_run_json()  # the commit point of the append
        self.telemetry = Telemetry(self.run_dir) if self.is_main else None
        self._barrier()

    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        want = self.cfg.train.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if self.world > 1:
            dist.init_process_group("nccl" if want == "cuda" else "gloo")
            if want == "cuda":
                want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        try:
            self.device = torch.device(want)
        except RuntimeError as exc:
            raise TrainerError(f"train.device: {exc}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainerError(f"train.device {want!r}: CUDA is not available here")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise TrainerError(
                f"train.device {want!r}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s)"
            )
        if self.device.type not in ("cpu", "cuda"):
            raise TrainerError(f"train.device {want!r}: the trainer runs on cpu or cuda")
        precision = self.cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _setup_base(self) -> None:
        """Checkpoint tensors (version 0), tokenizer and encoder; checks every task fits."""
        from transformers import AutoTokenizer

        model_dir = self.cfg.model
        try:
            self.base_state = load_tensors(model_dir)  # checkpoint dtype, CPU
        except JlserveError as exc:
            raise TrainerError(f"model: {exc}") from None
        self.base_fingerprint = fingerprint(self.base_state)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainerError(f"model: {model_dir}: cannot load the tokenizer ({first})") from None
        self.enc = Encoder(self.tokenizer, self.cfg.data.max_length, self.cfg.data.prompt_format)
        for task in self.tasks:
            self.enc.body_budget(task)  # max_length fits every task's prompt and targets

    def _load_model(self) -> torch.nn.Module:
        """The base checkpoint as a transformers model, in the run's precision and device."""
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype)
        return model.to(self.device).requires_grad_(False)

    def _setup_model(self) -> None:
        self.model = self._load_model()
        self.model.config.use_cache = True
        probe = Adapter(self.model, self.cfg.adapter)  # validates targets, names the weights
        self.adapted_numel = {
            f"{n}.weight": m.base.weight.numel() for n, m in probe.modules.items()
        }
        probe.unload()
        missing = [n for n in self.adapted_numel if n not in self.base_state]
        if missing:
            raise TrainerError(f"adapted weights not in the checkpoint by name: {missing[:3]}")
        self.state = dict(self.base_state)  # the current version's tensors, checkpoint dtype

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ------------------------------------------------------------------ run directory

    def _check_run_dir(self) -> None:
        started = (self.run_dir / "run.json").is_file()
        if self.added and started:
            return  # an append continues the run
        if self.resume and not started:
            raise TrainerError(f"{self.run_dir}: no run.json, nothing to resume")
        if not started and self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise TrainerError(
                f"{self.run_dir}: exists and is not empty; use --resume or a new dir"
            )

    def _init_run_dir(self) -> None:
        for sub in ("deltas", "merged", "state"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_yaml(self.cfg, self.command))
        self._write_run_json()

    def _write_run_json(self) -> None:
        info = {
            "command": self.command,
            "config": self.cfg.model_dump(mode="json"),
            "base_model": str(self.cfg.model),
            "base_fingerprint": self.base_fingerprint,
            "tasks": [t.name for t in self.tasks],
            "appended": self.appended,
            "completed": self.completed,
            "versions": self.versions,
            "task_log": self.task_log,
            "loss": {"matrix": self.losses.matrix, "base": self.losses.base},
            "accuracy": {
                "exact": self.accuracy.exact,
                "prefix": self.accuracy.prefix,
                "base": self.accuracy.base,
                "base_prefix": self.accuracy.base_prefix,
            },
            "environment": {
                "jlserve": jlserve_version,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(self.device),
                "precision": self.precision,
                "world_size": self.world,
            },
        }
        atomic_write_bytes(self.run_dir / "run.json", json.dumps(info, indent=2).encode())

    def _load_progress(self, info: dict[str, Any]) -> None:
        if not same_config(info["config"], self.cfg):
            raise TrainerError(f"{self.run_dir}: --resume needs the same config as the run")
        if info["base_fingerprint"] != self.base_fingerprint:
            raise TrainerError(f"{self.run_dir}: the base model changed since the run started")
        self.completed = info["completed"]
        self.versions = info["versions"][: self.completed + 1]
        self.task_log = info["task_log"][: self.completed]
        self.accuracy.restore(info["accuracy"])  # grown by the tasks appended since
        self.losses.restore(info.get("loss"))
        if self.is_main:
            self._drop_partial_outputs()
        for v in self.versions[1:]:
            delta = read_delta(self.run_dir / "deltas" / v["delta"])
            self.density.update(v["task"], delta)
            self.overlap.update(v["task"], delta)
        if self.completed:
            last = self.versions[-1]
            self.state = load_tensors(self.run_dir / "merged" / last["merged"])
            if self.method.commits:
                self.model.load_state_dict(self.state, strict=False)
            method_state = load_file(self.run_dir / "state" / last["state"])
            self.method.load_state_dict(method_state, self.model)
            self.method.task_index = self.completed - 1

    def _drop_partial_outputs(self) -> None:
        """Remove files run.json does not name: those of a task that was being written when
        the run stopped, and those a committed task had not yet cleaned up."""
        named = self.versions[1:]
        keep = {
            "deltas": {v["delta"] for v in named},
            "merged": {v["merged"] for v in named if v.get("merged")},
            "state": {named[-1]["state"]} if named else set(),
        }
        for sub, names in keep.items():
            for path in (self.run_dir / sub).iterdir():
                if path.name in names:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    # ------------------------------------------------------------------ train

    def _loader(self, task: Task, task_index: int) -> DataLoader:
        """The task's shuffled global batches of train.batch_size; this rank's share of each
        (trainer.parallel: the same global batches for any number of processes)."""
        examples = self.enc.train_examples(task)
        seed = self.task_cfgs[task_index].train.seed  # the run's, or the task's own
        generator = torch.Generator().manual_seed(seed * 1000 + task_index)
        batch_size = self.task_cfgs[task_index].train.batch_size
        return DataLoader(
            Examples(examples),
            batch_sampler=global_batches(len(examples), batch_size, generator),
            generator=generator,
            collate_fn=self.enc.collate,
        )

    @torch.no_grad()
    def _forward_over(self, task: Task) -> None:
        """The model over the task's training inputs, in order, in eval mode, on every rank
        (identical results everywhere): what a method reading the inputs (InfLoRA) observes
        through hooks. Logits only for the last position (nobody reads them)."""
        loader = DataLoader(
            self.enc.train_examples(task),
            batch_size=self.cfg.train.batch_size,
            collate_fn=self.enc.collate,
        )
        training = self.model.training
        self.model.eval()
        with self.autocast():
            for batch in loader:
                self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    use_cache=False,
                    logits_to_keep=1,
                )
        self.model.train(training)

    def train_task(self, i: int, task: Task) -> tuple[Adapter, dict[str, Any]]:
        torch.manual_seed(self.task_cfgs[i].train.seed * 1000 + i)
        adapter = self.method.start_task(self.model, i)
        self.method.prepare_task(adapter, lambda: self._forward_over(task))
        settings = self.task_cfgs[i].train  # the run's, or the task's own (trainer.append)
        loader = self._loader(task, i)
        total = len(loader) * settings.epochs
        schedule = SparsitySchedule(total, *self.cfg.adapter.sparse_schedule)
        gate = self.cfg.adapter.gate
        optimizer = adapter_optimizer(adapter, settings.lr, self.cfg.adapter)
        model = self.model
        if dist.is_initialized():
            model = data_parallel(model, adapter, self.device)
        # On the CPU the padding costs its full compute: rows of like length go through in
        # groups there (trainer.step.grouped_loss: the same loss and gradient). Not under
        # torchrun: DDP expects one forward per backward, and the rank's loss
        # (trainer.parallel) normalises by the global token count itself. Not measured on
        # a GPU, so a GPU keeps one padded forward.
        by_length = self.device.type == "cpu" and not dist.is_initialized()
        model.train()
        log_every = max(1, total // 20)
        steps_before = sum(t["steps"] for t in self.task_log)  # the run's global step
        stats = {"loss": math.nan, "density": 1.0, "theta": math.nan}
        losses: list[float] = []
        reinit_phi: list[float] | None = None
        step = tokens = 0
        start = time.perf_counter()
        with self._progress() as progress:
            bar = progress.add_task(f"{i + 1}/{len(self.tasks)} {task.name}", total=total, **stats)
            for _epoch in range(settings.epochs):
                for batch in loader:
                    batch = {k: v.to(self.device) for k, v in batch.items()}

                    def task_loss(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
                        with self.autocast():
                            if by_length:
                                return grouped_loss(model, batch)
                            return model(**batch).loss

                    reinit = gate != "none" and step == schedule.t1
                    log_now = (step + 1) % log_every == 0 or step + 1 == total
                    result = train_step(
                        adapter,
                        optimizer,
                        task_loss,
                        schedule.f(step),
                        reinit=reinit,
                        extra_loss=self.method.extra_loss,
                        grad_clip=self.cfg.train.grad_clip,
                        measure_density=log_now,
                    )
                    if reinit:
                        reinit_phi = self._phi(adapter)
                    losses.append(result.loss)
                    tokens += int(batch["attention_mask"].sum())
                    step += 1
                    if log_now and self.telemetry is not None:
                        self._log_step(steps_before + step, result, adapter, optimizer)
                    if log_now:
                        stats = {
                            "loss": sum(losses[-log_every:]) / len(losses[-log_every:]),
                            "density": result.density,
                            "theta": float(adapter.thresholds.values().mean()),
                        }
                    progress.update(bar, advance=1, **stats)
                    if self.on_step is not None:
                        self.on_step(StepReport(task.name, step, total, stats if log_now else None))
        seconds = time.perf_counter() - start
        adapter.end_training()  # the last step moved dW: sync the threshold for the merge
        return adapter, {
            "steps": total,
            "trained_tokens": tokens,  # this rank's (prompt and answer, padding left out)
            "train_seconds": seconds,
            "seconds_per_step": seconds / total,
            "task_loss": "length groups" if by_length else "one padded batch",
            "final_loss": stats["loss"],
            "gate_density": adapter.density(),
            "theta": float(adapter.thresholds.values().mean()),
            "log_threshold_at_reinit": reinit_phi,
            "log_threshold": self._phi(adapter),
            "t1": schedule.t1,
            "t2": schedule.t2,
        }

    def _log_step(
        self, step: int, result: StepResult, adapter: Adapter, optimizer: torch.optim.Optimizer
    ) -> None:
        thetas = adapter.thresholds.values().detach().cpu().tolist()
        names = ["global"] if len(thetas) == 1 else [f"block{g}" for g in range(len(thetas))]
        self.telemetry.step(
            step,
            loss=result.loss,
            lr=optimizer.param_groups[0]["lr"],
            grad_norm=result.grad_norm,
            density=result.density,
            thetas=dict(zip(names, thetas, strict=True)),
            extras=result.extras,
        )

    @staticmethod
    def _phi(adapter: Adapter) -> list[float]:
        """phi per threshold group: log(theta / RMS(dW)); topk and the reference preset:
        log theta (absolute)."""
        return adapter.thresholds.phi.detach().cpu().tolist()

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} dens {task.fields[density]:.3%}"),
            TextColumn("theta {task.fields[theta]:.2e}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.is_main,
            transient=False,
        )

    # ------------------------------------------------------------------ evaluate / export

    def evaluate(self, i: int, fingerprint: str) -> int:
        """Row i of the accuracy matrix on version i + 1 (the model `fingerprint`; a server is
        identified by it, not by its version number): the tasks of `eval_columns`.
        i = -1: the base row, every task of the stream on version 0. Returns how many
        entries came from the eval cache."""
        if self.served is not None:
            self.served.wait_for_fingerprint(fingerprint)
        return self._evaluate_on(self.model, i, self.eval_columns(i), fingerprint)

    def _evaluate_on(
        self, model: torch.nn.Module, i: int, columns: list[int], fingerprint: str | None = None
    ) -> int:
        """Entries (i, j) for j in `columns`: the task's metric in process on `model`, or
        through the server when the run evaluates there and `fingerprint` names what it
        serves; the held-out loss always in process (the same weights). With an eval
        cache, an entry whose model (`fingerprint`), rows and evaluator match is read
        instead (never without a fingerprint: then the model is not known by one)."""
        model.eval()
        batch = self.cfg.train.eval_batch_size
        in_process = f"in process: {self.device.type}, {self.precision}, batch {batch}"
        via_server = self.served is not None and fingerprint is not None
        evaluator = f"{'through a server' if via_server else 'generated'}, loss {in_process}"
        hits = 0
        with self.autocast():
            for j in columns:
                task = self.tasks[j]
                key = cached = None
                if self.eval_cache is not None and fingerprint is not None:
                    key = self.eval_cache.key(fingerprint, self.enc, task, evaluator)
                    cached = self.eval_cache.get(key)
                if cached is not None:
                    r, loss = cached
                    hits += 1
                else:
                    if via_server:
                        predictions = self.served.predict(self.enc, task, fingerprint=fingerprint)
                        r = score(task, predictions)
                    else:
                        r = evaluate_task(model, self.enc, task, batch, self.device)
                    loss = held_out_loss(model, self.enc, task, batch, self.device)
                    if key is not None:
                        self.eval_cache.put(key, r, loss)
                self.accuracy.update(i, j, r.exact, r.prefix)
                self.losses.update(i, j, loss)
        return hits

    def _served_now(self, fingerprint: str) -> str | None:
        """`fingerprint` if the run evaluates through a server that serves it now."""
        if self.served is None or self.served.serving() != fingerprint:
            return None
        return fingerprint

    def evaluate_added(self) -> None:
        """Tasks appended to a run that has versions already: their base-row entries (on
        version 0) and, for FWT, the current version on the first of them, before it
        trains. On a model loaded for it (the training model holds the current version,
        and some methods an adapter), or through the server where it serves that version
        now (it usually serves the current one)."""
        base_missing = [j for j, b in enumerate(self.accuracy.base) if b is None]
        last, nxt = self.completed - 1, self.completed
        before_missing = (
            last >= 0 and nxt < len(self.tasks) and self.accuracy.exact[last][nxt] is None
        )
        if not base_missing and not before_missing:
            return
        model = self._load_model()  # version 0
        if base_missing:
            self._evaluate_on(model, -1, base_missing, self._served_now(self.base_fingerprint))
        if before_missing:
            model.load_state_dict(self.state, strict=False)  # the current version
            current = self.versions[-1]["fingerprint"]
            self._evaluate_on(model, last, [nxt], self._served_now(current))
        del model
        self._write_run_json()

    def eval_columns(self, i: int) -> list[int]:
        """The tasks row i evaluates: every task for the base row (i = -1); tasks 0..i+1
        under the full schedule; under "needed" the diagonal and the next task, and every
        task seen so far on the run's last row (this call's last task)."""
        n = len(self.tasks)
        if i < 0:
            return list(range(n))
        if self.cfg.train.eval_schedule == "full" or i == self.last_task - 1:
            return list(range(min(i + 2, n)))
        return [j for j in (i, i + 1) if j < n]

    def make_delta(self, i: int, task: Task, merged: dict[str, torch.Tensor]) -> SparseDelta:
        """The exact sparse delta from the current version to version i + 1."""
        return diff_tensors(
            self.state,
            {**self.state, **merged},
            task=task.name,
            version=i + 1,
            extra={"method": self.cfg.method.name},
        )

    def publish(self, i: int, task: Task, delta: SparseDelta, log: dict) -> None:
        receipt = self.publisher.publish(delta, delta.to_bytes(), delta_name(i + 1, task.name))
        log.update(publish=receipt.note, swap_s=receipt.swap_s)
        self.console.print(f"  {receipt.note}")

    def export(
        self, i: int, task: Task, merged: dict[str, torch.Tensor], delta: SparseDelta, log: dict
    ) -> None:
        version = i + 1
        new_state = {**self.state, **merged}
        dname, mname = delta_name(version, task.name), merged_name(version, task.name)
        sname = state_name(version)
        write_delta(delta, self.run_dir / "deltas" / dname)
        write_checkpoint(new_state, self.run_dir / "merged" / mname, like=self.cfg.model)
        save_file(self.method.state_dict(), str(self.run_dir / "state" / sname))
        previous = self.versions[-1]
        self.density.update(task.name, delta)
        self.overlap.update(task.name, delta)
        self.state = new_state
        self.completed = version
        log.update(
            task=task.name,
            delta_nnz=delta.nnz,
            delta_density=self.density.per_task[task.name]["density"],
            accuracy=self.accuracy.exact[i][i],
            **peak_memory(self.device),
        )
        self.task_log.append(log)
        self.versions.append(
            {
                "version": version,
                "task": task.name,
                "fingerprint": delta.metadata.child_fingerprint,
                "delta": dname,
                "merged": mname,
                "state": sname,
            }
        )
        drop_merged = previous.get("merged") if not self.cfg.keep_all_merged else None
        if drop_merged:
            previous["merged"] = None
        self._write_run_json()  # the commit point of this task
        # Only now may the previous version's files go: until run.json names this version,
        # a resume restarts from them.
        if drop_merged:
            shutil.rmtree(self.run_dir / "merged" / drop_merged, ignore_errors=True)
        if previous.get("state"):
            (self.run_dir / "state" / previous["state"]).unlink(missing_ok=True)
        self.write_metrics()

    def metrics(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy.result(),
            "task_metrics": {t.name: t.metric for t in self.tasks},  # what "accuracy" holds
            "loss": self.losses.result(),
            "density_summary": self.density.summary(),
            "density": self.density.result(),
            "support_overlap": self.overlap.result(),
            "tasks": self.task_log,
        }

    def write_metrics(self) -> None:
        metrics = self.metrics()
        atomic_write_bytes(self.run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
        write_report(self.run_dir, metrics, self.cfg, self.command)

    def _summary(self, i: int, log: dict) -> str:
        acc = self.accuracy.result()
        return (
            f"task {i + 1}/{len(self.tasks)} {log['task']}: {log['steps']} steps "
            f"{log['seconds_per_step']:.3f} s/step, loss {log['final_loss']:.3f}, "
            f"delta density {log['delta_density']:.2%}, acc {log['accuracy']:.3f}"
            + (self._stream_summary(acc) if acc.get("OA_after") == log["task"] else "")
        )

    @staticmethod
    def _stream_summary(acc: dict[str, Any]) -> str:
        bwt = f", BWT {acc['BWT']:+.3f}" if acc.get("BWT") is not None else ""
        return f", OA {acc['OA']:.3f}{bwt}"

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.cleanup()

    def _run(self) -> dict[str, Any]:
        self.setup()
        last = self.last_task
        if self.is_main and self.accuracy.base[0] is None:  # the base row, once per run
            self.evaluate(-1, self.base_fingerprint)
            self._write_run_json()
        elif self.is_main:
            self.evaluate_added()
        for i in range(self.completed, last):
            task = self.tasks[i]
            adapter, log = self.train_task(i, task)
            merged = adapter.merged_weights(self.state)
            kept = self.method.end_task(adapter, merged)
            if self.is_main:
                delta = self.make_delta(i, task, merged)
                if self.publisher is not None:  # before evaluating: --eval-via needs it served
                    self.publish(i, task, delta, log)
                start = time.perf_counter()
                with self.method.eval_view(kept, merged):
                    cached = self.evaluate(i, delta.metadata.child_fingerprint)
                log["eval_seconds"] = time.perf_counter() - start  # row i, whatever the engine
                if self.eval_cache is not None:
                    log["eval_cached"] = cached  # entries of row i read, not evaluated
                self.export(i, task, merged, delta, log)
                self.console.print(self._summary(i, log))
                if self.telemetry is not None:
                    self.telemetry.task_end(i, self.accuracy.result(), log["delta_density"])
                if self.on_task_end is not None:
                    self.on_task_end(self.metrics())
            self._barrier()
        if self.is_main:
            self.write_metrics()
        return self.metrics()

    def cleanup(self) -> None:
        telemetry = getattr(self, "telemetry", None)  # absent when setup stopped early
        if telemetry is not None:
            telemetry.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: RunConfig, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) a continual-learning run; returns the metrics."""
    return Recipe(cfg, run_dir, **kwargs).run()
