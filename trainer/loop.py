"""The continual-learning task loop, one recipe: setup, then per task train -> merge ->
evaluate -> export, then cleanup (torchtune-recipe style: read it top to bottom).

Per task i (version i+1; version 0 is the base model):
  1. method.start_task injects the adapter (fresh for IncLoRA/ELLA/O-LoRA)
  2. T optimizer steps; f from the schedule; theta re-initialised at step t1
  3. merged = W0 + s*J(dW) per adapted weight, rounded to the checkpoint dtype
  4. method.end_task commits it (or keeps the adapter: SeqLoRA)
  5. greedy exact-match evaluation on tasks 0..i, on exactly the exported weights
  6. delta = diff(previous state, new state) in the checkpoint dtype -> deltas/, and the
     merged checkpoint -> merged/; run.json is rewritten last, as the commit point.

Determinism and `--resume`: every task reseeds torch and its data order from
(seed, task index), and the loop's only state besides the checkpoint is the method's
(saved in state/method.safetensors) and the accuracy rows (in run.json), so a resumed
run continues exactly where an uninterrupted one would be.

Multi-GPU: under `torchrun --nproc_per_node N` each task trains under PyTorch DDP with a
DistributedSampler; rank 0 evaluates and writes, the others wait.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from jlserve import __version__ as jlserve_version
from jlserve.checkpoint import atomic_write_bytes, fingerprint, load_tensors, write_checkpoint
from jlserve.delta import diff_tensors, read_delta, write_delta
from jlserve.errors import JlserveError
from trainer.adapter import Adapter
from trainer.config import RunConfig, config_yaml
from trainer.data import Encoder, Task, evaluate_task, load_stream
from trainer.errors import TrainerError
from trainer.methods import Method, build_method
from trainer.metrics import AccuracyMatrix, DeltaDensity, SupportOverlap
from trainer.report import write_report
from trainer.schedule import SparsitySchedule


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def delta_name(version: int, task: str) -> str:
    return f"task{version:03d}-{_slug(task)}.safetensors"


def merged_name(version: int, task: str) -> str:
    return f"v{version:03d}-{_slug(task)}"


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.command = command
        self.resume = resume
        self.stop_after = stop_after
        self.console = console or Console(stderr=True)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._check_run_dir()  # fail fast, before loading anything
        self._setup_distributed()
        self._setup_model()
        self.tasks: list[Task] = load_stream(self.cfg.data, self.cfg.train.seed)
        self.enc = Encoder(self.tokenizer, self.cfg.data.max_length)
        self.method: Method = build_method(self.cfg)
        names = [t.name for t in self.tasks]
        self.accuracy = AccuracyMatrix(names)
        self.density = DeltaDensity(self.adapted_numel)
        self.overlap = SupportOverlap()
        self.completed = 0
        self.task_log: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = [
            {"version": 0, "task": None, "fingerprint": self.base_fingerprint}
        ]
        if self.resume:
            self._load_progress()
        elif self.is_main:
            self._init_run_dir()
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
        precision = self.cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _setup_model(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = self.cfg.model
        try:
            self.base_state = load_tensors(model_dir)  # checkpoint dtype, CPU
        except JlserveError as exc:
            raise TrainerError(f"model: {exc}") from None
        self.base_fingerprint = fingerprint(self.base_state)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device)
        self.model.requires_grad_(False)
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
        if self.resume and not (self.run_dir / "run.json").is_file():
            raise TrainerError(f"{self.run_dir}: no run.json, nothing to resume")
        if not self.resume and self.run_dir.exists() and any(self.run_dir.iterdir()):
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
            "completed": self.completed,
            "versions": self.versions,
            "task_log": self.task_log,
            "accuracy": {"exact": self.accuracy.exact, "prefix": self.accuracy.prefix},
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

    def _load_progress(self) -> None:
        info = json.loads((self.run_dir / "run.json").read_text())
        if info["config"] != self.cfg.model_dump(mode="json"):
            raise TrainerError(f"{self.run_dir}: --resume needs the same config as the run")
        if info["base_fingerprint"] != self.base_fingerprint:
            raise TrainerError(f"{self.run_dir}: the base model changed since the run started")
        self.completed = info["completed"]
        self.versions = info["versions"][: self.completed + 1]
        self.task_log = info["task_log"][: self.completed]
        self.accuracy.exact = info["accuracy"]["exact"]
        self.accuracy.prefix = info["accuracy"]["prefix"]
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
            method_state = load_file(self.run_dir / "state" / "method.safetensors")
            self.method.load_state_dict(method_state, self.model)
            self.method.task_index = self.completed - 1

    def _drop_partial_outputs(self) -> None:
        """Remove files of a task that was being written when the run stopped."""
        keep_deltas = {v["delta"] for v in self.versions[1:]}
        for f in (self.run_dir / "deltas").iterdir():
            if f.name not in keep_deltas:
                f.unlink()
        keep_merged = {v["merged"] for v in self.versions[1:] if v.get("merged")}
        for d in (self.run_dir / "merged").iterdir():
            if d.name not in keep_merged:
                shutil.rmtree(d)

    # ------------------------------------------------------------------ train

    def _loader(self, task: Task, task_index: int) -> DataLoader:
        examples = self.enc.train_examples(task)
        if not examples:
            raise TrainerError(f"task {task.name} has no training rows")
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + task_index)
        sampler = None
        if dist.is_initialized():
            sampler = DistributedSampler(
                examples, shuffle=True, seed=self.cfg.train.seed + task_index
            )
        return DataLoader(
            examples,
            batch_size=self.cfg.train.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            collate_fn=self.enc.collate,
        )

    def _optimizer(self, adapter: Adapter) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{"params": list(adapter.lora_parameters())}]
        if self.cfg.adapter.gate == "jump":
            lr = self.cfg.adapter.threshold_lr or self.cfg.train.lr
            groups.append({"params": [adapter.thresholds.phi], "lr": lr})
        return torch.optim.AdamW(groups, lr=self.cfg.train.lr, weight_decay=0.0)

    def train_task(self, i: int, task: Task) -> tuple[Adapter, dict[str, Any]]:
        torch.manual_seed(self.cfg.train.seed * 1000 + i)
        adapter = self.method.start_task(self.model, i)
        loader = self._loader(task, i)
        total = len(loader) * self.cfg.train.epochs
        schedule = SparsitySchedule(total)
        gated = self.cfg.adapter.gate == "jump"
        optimizer = self._optimizer(adapter)
        model = self.model
        if dist.is_initialized():
            model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        model.train()
        log_every = max(1, total // 20)
        stats = {"loss": math.nan, "density": 1.0, "theta": math.nan}
        losses: list[float] = []
        step = 0
        start = time.perf_counter()
        with self._progress() as progress:
            bar = progress.add_task(f"{i + 1}/{len(self.tasks)} {task.name}", total=total, **stats)
            for epoch in range(self.cfg.train.epochs):
                if isinstance(loader.sampler, DistributedSampler):
                    loader.sampler.set_epoch(epoch)
                for batch in loader:
                    f = schedule.f(step)
                    adapter.set_f(f)
                    if gated and step == schedule.t1:
                        adapter.reinit_thresholds()
                    if gated and step >= schedule.t1:
                        adapter.update_floor()
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    with self.autocast():
                        ce = model(**batch).loss
                    extras = self.method.extra_loss(adapter, f)
                    if gated and f > 0.0 and self.cfg.adapter.l0_weight > 0.0:
                        extras["l0"] = self.cfg.adapter.l0_weight * adapter.l0_term()
                    loss = ce + sum(extras.values())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(ce.item())
                    step += 1
                    if step % log_every == 0 or step == total:
                        stats = {
                            "loss": sum(losses[-log_every:]) / len(losses[-log_every:]),
                            "density": adapter.density(),
                            "theta": float(adapter.thresholds.values().mean()),
                        }
                    progress.update(bar, advance=1, **stats)
        seconds = time.perf_counter() - start
        if gated:
            adapter.update_floor()  # the last step moved dW: re-apply the budget for the merge
        return adapter, {
            "steps": total,
            "train_seconds": seconds,
            "seconds_per_step": seconds / total,
            "final_loss": stats["loss"],
            "gate_density": adapter.density(),
            "theta": stats["theta"],
            "t1": schedule.t1,
            "t2": schedule.t2,
        }

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

    def evaluate(self, i: int) -> None:
        self.model.eval()
        with self.autocast():
            for j in range(i + 1):
                r = evaluate_task(
                    self.model, self.enc, self.tasks[j], self.cfg.train.eval_batch_size, self.device
                )
                self.accuracy.update(i, j, r.exact, r.prefix)

    def export(self, i: int, task: Task, merged: dict[str, torch.Tensor], log: dict) -> None:
        version = i + 1
        new_state = {**self.state, **merged}
        delta = diff_tensors(
            self.state,
            new_state,
            task=task.name,
            version=version,
            extra={"method": self.cfg.method.name},
        )
        dname, mname = delta_name(version, task.name), merged_name(version, task.name)
        write_delta(delta, self.run_dir / "deltas" / dname)
        write_checkpoint(new_state, self.run_dir / "merged" / mname, like=self.cfg.model)
        previous = self.versions[-1].get("merged")
        self.density.update(task.name, delta)
        self.overlap.update(task.name, delta)
        save_file(self.method.state_dict(), str(self.run_dir / "state" / "method.safetensors"))
        self.state = new_state
        self.completed = version
        log.update(
            task=task.name,
            delta_nnz=delta.nnz,
            delta_density=self.density.per_task[task.name]["density"],
            accuracy=self.accuracy.exact[i][i],
            peak_rss_mib=peak_rss_mib(),
        )
        self.task_log.append(log)
        self.versions.append(
            {
                "version": version,
                "task": task.name,
                "fingerprint": delta.metadata.child_fingerprint,
                "delta": dname,
                "merged": mname,
            }
        )
        if previous and not self.cfg.keep_all_merged:
            shutil.rmtree(self.run_dir / "merged" / previous, ignore_errors=True)
            self.versions[-2]["merged"] = None
        self._write_run_json()  # the commit point of this task
        self.write_metrics()

    def metrics(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy.result(self.cfg.fwt_baseline),
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
            f"delta density {log['delta_density']:.2%}, acc {log['accuracy']:.3f}, "
            f"OA {acc['OA']:.3f}"
            + (f", BWT {acc['BWT']:+.3f}" if acc.get("BWT") is not None else "")
        )

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        self.setup()
        last = len(self.tasks) if self.stop_after is None else min(self.stop_after, len(self.tasks))
        for i in range(self.completed, last):
            task = self.tasks[i]
            adapter, log = self.train_task(i, task)
            merged = adapter.merged_weights(self.state)
            kept = self.method.end_task(adapter, merged)
            if self.is_main:
                with self.method.eval_view(kept, merged):
                    self.evaluate(i)
                self.export(i, task, merged, log)
                self.console.print(self._summary(i, log))
            self._barrier()
        if self.is_main:
            self.write_metrics()
        self.cleanup()
        return self.metrics()

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: RunConfig, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) a continual-learning run; returns the metrics."""
    return Recipe(cfg, run_dir, **kwargs).run()
