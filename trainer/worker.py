"""`jlserve worker`: train the server's fine-tuning jobs, one after another, as tasks of a run.

    jlserve worker --url URL --run DIR [--config CFG] [--set KEY=VALUE ...]
                   [--admin-token-file F] [--name NAME] [--poll 2] [--max-jobs N]

The worker talks to the server only over HTTP (jlserve.jobs.client), so it can live on
another machine (a GPU node) or the same one. For each job it claims:

  1. a lease, renewed by a heartbeat thread every third of its length; a renewal that
     says "cancel" stops training at the next optimizer step;
  2. the job's files, downloaded (the append copies their rows into the run);
  3. the task appended to the run (`jlserve learn`'s path) and trained on top of the run's
     last version, which must be the model the server served when the job was claimed
     (else the job fails `model_out_of_sync` and the run is left as it was);
  4. the delta published through the job (the server applies it with If-Match on that
     model: one that changed meanwhile fails the job `parent_changed`);
  5. the task evaluated and exported as usual, then the job finished with the metrics.

A job that stops before its version is committed (cancelled, refused, failed) is taken
back out of the run (trainer.append.withdraw_unfinished), so the next job continues from
the run's last version. The job's hyperparameters become the task's own settings
(`n_epochs` -> train.epochs, `batch_size` -> train.batch_size,
`learning_rate_multiplier` x the run's train.lr) and its `seed` the task's train.seed (the
run's, for the job that starts the run); its `suffix` is the task's name.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from rich.console import Console

from jlserve.client import resolve_token
from jlserve.delta import SparseDelta
from jlserve.errors import AdminRequestError, JlserveError, ServerUnreachableError
from jlserve.jobs.client import WorkerClient
from jlserve.jobs.schemas import (
    ClaimResponse,
    ErrorObject,
    FinishRequest,
    JobErrorCode,
    WorkerEvent,
)
from jlserve.taskfile import TaskFileError
from trainer.append import AddedTask, withdraw_unfinished
from trainer.config import RunConfig, add_config_arguments, load_config
from trainer.errors import OutOfSyncError, TrainerError
from trainer.publish import Receipt

T = TypeVar("T")
RETRY_S = 2.0
HEARTBEAT_S = 1.0  # how often the lease is renewed: a cancel is heard within about this
TRAIN_NAME, VALIDATION_NAME = (
    "train.jsonl",
    "validation.jsonl",
)  # the downloaded files  # between attempts to reach a server that does not answer
PATIENCE_S = 600.0  # how long a job's call waits for a server that is away (restarting)


def patiently(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, retried while the server cannot be reached (a restart keeps the job
    and extends its lease), for up to PATIENCE_S."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            return call(*args)
        except (ServerUnreachableError, httpx.TimeoutException):
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_S)


class JobStopped(TrainerError):
    """The job ended while training (cancelled, or its lease lost): stop the run."""

    def __init__(self, message: str, *, cancelled: bool) -> None:
        super().__init__(message)
        self.cancelled = cancelled


class JobRefused(TrainerError):
    """The server refused the job's delta; it has already failed the job."""


class Heartbeat(threading.Thread):
    """Renews the job's lease every third of its length; records cancel and loss."""

    def __init__(self, client: WorkerClient, job_id: str, lease_id: str, every_s: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.client, self.job_id, self.lease_id, self.every_s = client, job_id, lease_id, every_s
        self.cancel_requested = False
        self.lost: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            try:
                status = self.client.renew(self.job_id, self.lease_id)
            except (ServerUnreachableError, httpx.TimeoutException):
                continue  # a restarting server extends running leases when it is back
            except AdminRequestError as exc:
                if exc.status in (404, 409):  # the job ended, or is another worker's now
                    self.lost = str(exc)
                    return
                continue  # starting (503), a server error: try again at the next beat
            self.cancel_requested = status.cancel_requested

    def stop(self) -> None:
        self._stop_event.set()

    def check(self) -> None:
        """Raise JobStopped if the job must stop (called after every optimizer step)."""
        if self.cancel_requested:
            raise JobStopped("cancelled by the client", cancelled=True)
        if self.lost:
            raise JobStopped(f"lease lost: {self.lost}", cancelled=False)


class JobPublisher:
    """Publishes the job's delta through the job (the server checks its parent)."""

    def __init__(self, client: WorkerClient, job_id: str, lease_id: str) -> None:
        self.client, self.job_id, self.lease_id = client, job_id, lease_id
        self.version: int | None = None

    def publish(self, delta: SparseDelta, data: bytes, file_name: str) -> Receipt:
        try:
            job = patiently(self.client.publish, self.job_id, self.lease_id, data)
        except AdminRequestError as exc:
            raise JobRefused(f"publish {file_name}: {exc}") from None
        self.version = job.version
        return Receipt(f"published {delta.metadata.task} as served version {job.version}")


class Worker:
    def __init__(self, client: WorkerClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.run_dir: Path = args.run
        self.name: str = args.name or f"{socket.gethostname()}:{self.run_dir}"
        self.console = Console(stderr=True)

    def serve_forever(self) -> int:
        """Claim and run jobs until --max-jobs were run (forever without it)."""
        self.settle_unfinished()
        done = 0
        while self.args.max_jobs is None or done < self.args.max_jobs:
            try:
                claim = self.client.claim(self.name)
            except (ServerUnreachableError, httpx.TimeoutException) as exc:
                self.console.print(f"waiting for the server: {exc}")
                time.sleep(RETRY_S)
                continue
            except AdminRequestError as exc:
                if exc.status != 503:  # a wrong token or URL: stop and say so
                    raise
                time.sleep(RETRY_S)  # still starting
                continue
            if claim is None:
                time.sleep(self.args.poll)
                continue
            self.run_job(claim)
            done += 1
        return 0

    def run_job(self, claim: ClaimResponse) -> None:
        job, lease = claim.job, claim.lease
        self.console.print(
            f"job {job.id}: task {job.task} on top of version {claim.parent_version}"
        )
        beat = Heartbeat(self.client, job.id, lease.id, min(HEARTBEAT_S, lease.duration_s / 3))
        beat.start()
        publisher = JobPublisher(self.client, job.id, lease.id)
        try:
            self._report(job.id, lease.id, f"Worker {self.name} took the job")
            finish = self._train(claim, beat, publisher)
        except JobStopped as exc:
            finish = FinishRequest(lease_id=lease.id, status="cancelled") if exc.cancelled else None
        except JobRefused as exc:
            self.console.print(f"job {job.id}: {exc}")
            # the server fails the job itself when its checks refuse the delta; a refusal
            # before them (e.g. over the size limit) is reported here (else: 409, ignored)
            finish = (
                FinishRequest(lease_id=lease.id, status="cancelled")
                if beat.cancel_requested  # cancelled between the last step and the publish
                else self._failed(lease.id, JobErrorCode.PUBLISH_REFUSED, str(exc))
            )
        except JlserveError as exc:
            code = JobErrorCode.TRAINING_FAILED
            if isinstance(exc, TaskFileError):
                code = (
                    JobErrorCode.INVALID_VALIDATION_FILE
                    if Path(exc.path).name == VALIDATION_NAME
                    else JobErrorCode.INVALID_TRAINING_FILE
                )
            elif isinstance(exc, OutOfSyncError):
                code = JobErrorCode.MODEL_OUT_OF_SYNC
            finish = self._failed(lease.id, code, str(exc))
        except Exception as exc:  # a bug: the job fails with it, the worker goes on
            traceback.print_exc()
            finish = self._failed(
                lease.id, JobErrorCode.TRAINING_FAILED, f"{type(exc).__name__}: {exc}"
            )
        finally:
            beat.stop()
        if publisher.version is not None and (finish is None or finish.status != "succeeded"):
            # published, then stopped before the run committed: the job did succeed
            finish = FinishRequest(lease_id=lease.id, status="succeeded")
        self.settle_unfinished(published=publisher.version is not None)
        if finish is not None:
            try:
                patiently(self.client.finish, job.id, finish)
            except AdminRequestError as exc:
                self.console.print(f"job {job.id}: could not finish it: {exc}")
        self.console.print(f"job {job.id}: {finish.status if finish else 'ended by the server'}")

    @staticmethod
    def _failed(lease_id: str, code: JobErrorCode, message: str) -> FinishRequest:
        return FinishRequest(
            lease_id=lease_id,
            status="failed",
            error=ErrorObject(code=code.value, message=message[:4000]),
        )

    def settle_unfinished(self, published: bool | None = None) -> None:
        """Bring the run back to a finished state after a job that stopped midway: take
        its task back out when nothing of it was published, or, when the job's version was
        published before the run committed it, finish the task (`--resume`: training is
        seeded, so it makes the same delta) so the run is at the served model again.
        `published` None (at start, after a worker died): judged by whether the served
        model is still the run's last version."""
        path = self.run_dir / "run.json"
        if not path.is_file():
            return
        info = json.loads(path.read_text())
        if info["completed"] == len(info["tasks"]):
            return
        if published is None:
            served = patiently(self.client.status).fingerprint
            published = served != info["versions"][info["completed"]]["fingerprint"]
        if not published:
            taken = withdraw_unfinished(self.run_dir)
            self.console.print(f"took unfinished tasks {taken} back out of {self.run_dir}")
            return
        from trainer.loop import train

        self.console.print(
            f"{self.run_dir}: its unfinished task was published before the run committed it; "
            "finishing it (--resume)"
        )
        cfg = RunConfig.model_validate(info["config"])
        train(cfg, self.run_dir, command=info.get("command", ""), resume=True)

    def _train(
        self, claim: ClaimResponse, beat: Heartbeat, publisher: JobPublisher
    ) -> FinishRequest:
        job, lease = claim.job, claim.lease
        with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as folder:
            # only until the append: the task's rows are then copied into the run
            train_file = patiently(
                self.client.download,
                job.id,
                lease.id,
                "training_file",
                Path(folder) / TRAIN_NAME,
            )
            validation = None
            if job.validation_file is not None:
                validation = patiently(
                    self.client.download,
                    job.id,
                    lease.id,
                    "validation_file",
                    Path(folder) / VALIDATION_NAME,
                )
            return self._train_files(claim, beat, publisher, train_file, validation)

    def _train_files(
        self,
        claim: ClaimResponse,
        beat: Heartbeat,
        publisher: JobPublisher,
        train_file: Path,
        validation: Path | None,
    ) -> FinishRequest:
        from trainer.cli import append_config
        from trainer.loop import Recipe, StepReport

        job, lease = claim.job, claim.lease
        overrides = [
            *self.args.overrides,
            *self._overrides(job.hyperparameters.model_dump()),
            f"train.seed={job.seed}",
        ]
        cfg, settings, command = append_config(
            self.run_dir, self.args.config, overrides, False, f"jlserve worker --run {self.run_dir}"
        )
        pending: list[WorkerEvent] = []

        def on_step(report: StepReport) -> None:
            beat.check()
            if report.stats is None:
                return
            data = {
                "step": report.step,
                "total_steps": report.total,
                "train_loss": report.stats["loss"],
            }
            data |= {k: report.stats[k] for k in ("density", "theta")}
            pending.append(
                WorkerEvent(
                    type="metrics",
                    message=f"Step {report.step}/{report.total}: training loss={report.stats['loss']:.4f}",
                    data=data,
                )
            )
            self._report_all(job.id, lease.id, pending)

        recipe = Recipe(
            cfg,
            self.run_dir,
            command=command,
            publisher=publisher,
            on_step=on_step,
            added=[AddedTask(job.task, train_file, validation)],
            added_settings=settings,
            expect_fingerprint=claim.parent_fingerprint,
        )
        metrics = recipe.run()
        beat.check()
        log = metrics["tasks"][-1]
        index = metrics["loss"]["tasks"].index(job.task)
        held_out_loss = metrics["loss"]["matrix"][index][index]
        self._report(
            job.id,
            lease.id,
            f"Evaluated: {job.task} {metrics['task_metrics'][job.task]} {log['accuracy']:.4f}, "
            f"held-out loss {held_out_loss:.4f}",
            {"accuracy": metrics["accuracy"], "loss": metrics["loss"]},
        )
        return FinishRequest(
            lease_id=lease.id,
            status="succeeded",
            trained_tokens=log.get("trained_tokens"),
            steps=log["steps"],
            metrics=metrics,
            checkpoint_metrics={
                "step": float(log["steps"]),
                "train_loss": log["final_loss"],
                "full_valid_loss": held_out_loss,
                "full_valid_mean_token_accuracy": None,
            },
        )

    def _overrides(self, hyperparameters: dict[str, Any]) -> list[str]:
        """The job's hyperparameters as --set overrides ("auto": the config's value)."""
        out = []
        if hyperparameters["n_epochs"] != "auto":
            out.append(f"train.epochs={hyperparameters['n_epochs']}")
        if hyperparameters["batch_size"] != "auto":
            out.append(f"train.batch_size={hyperparameters['batch_size']}")
        multiplier = hyperparameters["learning_rate_multiplier"]
        if multiplier != "auto":
            run_json = self.run_dir / "run.json"
            start = None
            if run_json.is_file():
                start = json.loads(run_json.read_text())["config"]
            base = load_config(self.args.config, self.args.overrides, start=start).train.lr
            out.append(f"train.lr={base * float(multiplier)}")
        return out

    def _report(self, job_id: str, lease_id: str, message: str, data: dict | None = None) -> None:
        self._report_all(job_id, lease_id, [WorkerEvent(message=message, data=data)])

    def _report_all(self, job_id: str, lease_id: str, events: list[WorkerEvent]) -> None:
        """Send `events` (emptied once sent); kept for the next call if the server is away."""
        try:
            self.client.events(job_id, lease_id, list(events))
        except (ServerUnreachableError, httpx.TimeoutException):
            return
        except AdminRequestError as exc:
            raise JobStopped(f"lease lost: {exc}", cancelled=False) from None
        events.clear()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="train a jlserve server's fine-tuning jobs as tasks of a continual run",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--url", required=True, help="the jlserve server, e.g. http://host:8000")
    parser.add_argument("--run", type=Path, required=True, help="the worker's run directory")
    add_config_arguments(parser, "YAML config of the run when the worker starts it (configs/)")
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        help="the server's admin token (default: $JLSERVE_ADMIN_TOKEN_FILE / $JLSERVE_ADMIN_TOKEN)",
    )
    parser.add_argument("--name", help="this worker's name in job events (default: host:run)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between claims when idle")
    parser.add_argument("--max-jobs", type=int, help="exit after this many jobs (default: never)")
    parser.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    if args.poll <= 0 or (args.max_jobs is not None and args.max_jobs < 1):
        raise TrainerError("--poll must be above 0 and --max-jobs at least 1")
    with WorkerClient(args.url, resolve_token(args.admin_token_file)) as client:
        return Worker(client, args).serve_forever()
