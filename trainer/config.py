"""One pydantic model for a training run: a YAML file plus `--set key=value` overrides.

The validated config is saved in the run directory (config.yaml, with the command that
produced it as a header comment) and inside run.json; `--resume` refuses a different one.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.errors import TrainerError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def project_root() -> Path:
    """The checkout this trainer runs from (pyproject.toml beside trainer/); the current
    directory when the package is installed outside a checkout."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def default_data_root() -> Path:
    """`data/cl_benchmark` of the checkout, wherever the command runs from: where
    `jlserve data cl-benchmark` writes by default (docs/data.md)."""
    return project_root() / "data" / "cl_benchmark"


class DataConfig(_Strict):
    # Default: <checkout>/data/cl_benchmark from any directory. A path given in a config or
    # with --set is taken as it is (a relative one from the current directory).
    root: Path = Field(default_factory=default_data_root)
    # The stream: a key of tasks.json "orders", or a list of task names (which wins). Both
    # null: no fixed stream, only tasks appended with --add-task (trainer/append.py).
    order: str | None = "short_order_1"
    tasks: list[str] | None = Field(None, min_length=1)  # a custom stream; overrides `order`
    train_rows: int | None = Field(None, ge=1)  # cap per task (a seeded random subset)
    eval_rows: int | None = Field(None, ge=1)  # cap of dev rows per task
    max_length: int = Field(256, ge=8)  # prompt + target tokens
    # plain: the paper's reference prompt (the benchmark configs); chat: the tokenizer's chat
    # template, so what a task teaches answers /v1/chat/completions (the demo).
    prompt_format: Literal["plain", "chat"] = "plain"


L0_WEIGHT_DEFAULT = 1.0
SPARSE_SCHEDULE_DEFAULT = (0.2, 0.8)  # the blend's start and end (ref; trainer/schedule.py)

# The authors' threshold training (`threshold_training: reference`), as the reference code
# sets it: no L0 term, an absolute STE bandwidth, and phi = log theta trained by the same
# Adam learning rate as A and B (docs/method.md marks each (ref)).
REFERENCE_THRESHOLD = {"l0_weight": 0.0, "bandwidth": 1e-3, "threshold_lr": 1e-3}


class AdapterConfig(_Strict):
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    r: int = Field(8, ge=1)
    alpha: float = 32.0
    # jump: the learned JumpReLU threshold (the method). topk: the fixed-ratio rival, an
    # ablation (theta = the order statistic keeping as many entries as the adapter has
    # parameters, or `topk_density` of the entries, every step). none: the dense twin.
    gate: Literal["jump", "topk", "none"] = "jump"
    granularity: Literal["global", "per_block"] = "global"
    # The one sparsity knob: weight of the L0 term (fraction of kept dW entries) against
    # the cross-entropy, in nats per unit of density (docs/trainer.md for how it was chosen).
    l0_weight: float = Field(L0_WEIGHT_DEFAULT, ge=0)
    # Method constants (not tuned per task or layer): the STE kernel width (relative to
    # theta; absolute under `reference`), and the Adam learning rate of phi.
    bandwidth: float = Field(0.1, gt=0, le=1)
    threshold_lr: float = Field(0.05, gt=0)
    # ours: theta = exp(phi) * RMS(dW), relative bandwidth, STE summed over entries, the L0
    # term (docs/trainer.md, "The learned threshold"). reference: a named preset of the
    # authors' training, to show what their learned threshold does: theta = exp(phi) in
    # absolute units, STE averaged over each matrix's entries, REFERENCE_THRESHOLD's values.
    threshold_training: Literal["ours", "reference"] = "ours"
    # gate topk only: the fraction of dW entries kept (e.g. a learned gate's measured mean
    # density, a matched-density rival); None: as many as the adapter has parameters.
    topk_density: float | None = Field(None, gt=0, lt=1)
    # Where the dense-to-sparse blend starts and ends, as fractions of a task's steps (the
    # reference's 0.2 and 0.8; trainer/schedule.py). Other values are an ablation of how
    # long the adapter re-fits under the gate; [1, 1] trains dense and cuts once at the end.
    sparse_schedule: tuple[float, float] = SPARSE_SCHEDULE_DEFAULT

    @model_validator(mode="before")
    @classmethod
    def _reference_preset(cls, raw: Any) -> Any:
        """`threshold_training: reference` fills REFERENCE_THRESHOLD's values where unset."""
        if isinstance(raw, dict) and raw.get("threshold_training") == "reference":
            return {**REFERENCE_THRESHOLD, **raw}
        return raw

    @model_validator(mode="after")
    def _gate_options(self) -> AdapterConfig:
        start, end = self.sparse_schedule
        if not 0 <= start <= end <= 1:
            raise ValueError(f"sparse_schedule needs 0 <= start <= end <= 1, got [{start}, {end}]")
        if self.gate == "none" and self.sparse_schedule != SPARSE_SCHEDULE_DEFAULT:
            raise ValueError("sparse_schedule applies to a gate (jump, topk), not gate: none")
        if self.topk_density is not None and self.gate != "topk":
            raise ValueError(f"topk_density applies to gate: topk, not gate: {self.gate}")
        if self.threshold_training == "reference":
            if self.gate != "jump":
                raise ValueError(f"threshold_training: reference needs gate: jump, not {self.gate}")
            for key, value in REFERENCE_THRESHOLD.items():  # another value is not the reference
                if getattr(self, key) != value:
                    raise ValueError(
                        f"threshold_training: reference sets {key} to {value} "
                        f"(got {getattr(self, key)})"
                    )
        return self


class MethodConfig(_Strict):
    name: Literal["incLoRA", "seqLoRA", "ella", "olora", "inflora"] = "incLoRA"
    # One value, or one per task of the stream (the length is checked against the stream).
    ella_lambda: float | list[float] = 3e4
    olora_lambda: float = 0.5  # O-LoRA's lamda_1
    # InfLoRA's energy threshold of the input-subspace memory: rises linearly from the first
    # value (after task 1) towards the second over the stream (the authors' lamb, lame).
    inflora_threshold: float = Field(0.95, gt=0, le=1)
    inflora_threshold_end: float = Field(1.0, gt=0, le=1)

    def inflora_threshold_for(self, task_index: int, n_tasks: int) -> float:
        start, end = self.inflora_threshold, self.inflora_threshold_end
        return start + (end - start) * task_index / n_tasks

    def ella_lambda_for(self, task_index: int) -> float:
        if isinstance(self.ella_lambda, list):
            return self.ella_lambda[task_index]
        return self.ella_lambda


class TrainConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)  # the global batch; under torchrun shared by the ranks
    epochs: int = Field(1, ge=1)
    seed: int = 42
    device: str = "auto"  # auto: cuda when present, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    eval_batch_size: int = Field(32, ge=1)
    # full: after task i, every task seen so far and the next one (the whole accuracy
    # matrix and the next task's column, T(T+1)/2 + 2T - 1 task evaluations with the base
    # row). needed: only the entries OA, BWT and FWT read (base row, diagonal, the next
    # task, the run's last row): 4T - 2, 58 instead of 149 for a 15-task stream.
    eval_schedule: Literal["full", "needed"] = "full"
    grad_clip: float | None = Field(1.0, gt=0)  # max global norm of the adapter gradients


class RunConfig(_Strict):
    # A setting added here must default to the behaviour before it: `same_config` lets a
    # run saved without it resume under that default.
    model: Path  # an HF safetensors checkpoint directory (version 0)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    keep_all_merged: bool = False


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict, in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise TrainerError(f"--set expects key=value, got {assignment!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise TrainerError(f"--set {key}: value is not valid YAML ({_one_line(exc)})") from None
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainerError(f"--set {key}: {part!r} is not a section")
        node = child
    node[leaf] = parsed


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """`--config FILE` and the repeatable `--set KEY=VALUE` that `load_config` reads."""
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=5e-4 (repeatable)",
    )


def load_config(
    path: Path | None, overrides: list[str] | None = None, start: dict[str, Any] | None = None
) -> RunConfig:
    """Read a YAML config (or begin from `start`, else empty), apply overrides, validate."""
    raw: dict[str, Any] = copy.deepcopy(start) if start else {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise TrainerError(f"{path}: cannot read config ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise TrainerError(f"{path}: not valid YAML ({_one_line(exc)})") from None
        if not isinstance(raw, dict):
            raise TrainerError(f"{path}: a config must be a YAML mapping")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise TrainerError(f"invalid config: {problems}") from None


def same_config(saved: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a run's saved config (run.json) is `cfg`. The saved one is read by today's
    model, so a setting added since, whose default keeps the old behaviour, matches it."""
    try:
        saved_cfg = RunConfig.model_validate(saved)
    except ValidationError:
        return False
    return saved_cfg.model_dump(mode="json") == cfg.model_dump(mode="json")


def config_yaml(cfg: RunConfig, command: str) -> str:
    """The config as YAML, headed by the command that reproduces the run."""
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return f"# {command}\n{body}"
