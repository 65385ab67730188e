"""Training-step benchmark: step time and peak memory of JumpLoRA against plain LoRA (the
trainer's own dense path, `gate: none`) and PEFT's LoRA, same model, batch and length.

    .venv/bin/python -m bench.train_step            # SmolLM2 fp32, batch 8 x 128 tokens, 3 rounds
    .venv/bin/python -m bench.train_step --quick    # batch 2 x 64 tokens, 2 rounds
    .venv/bin/python -m bench.train_step --padding  # JumpLoRA, rows of 64-256 tokens:
                                                    # one padded batch vs length groups

Step = one optimizer step of the trainer (`trainer.step.train_step`, what the loop runs:
dW once per adapted matrix, threshold scale refreshed, forward with labels, the L0 term,
backward, gradient clipping, AdamW step). JumpLoRA is timed at f = 1 (the sparse phase,
its most expensive one: gate and straight-through estimator on every dW entry); the
trainer's dense phase f = 0 costs what `lora-trainer` costs. PEFT's LoRA: forward,
backward, AdamW. All variants: r = 8, alpha = 32, q_proj and v_proj, CPU fp32 (the
trainer's CPU default), random token batches.

Time: the variants alternate in ONE process (attach, 1 warm-up step, timed steps, detach;
round after round), median over all timed steps, as wall time and as this process's CPU
time (less sensitive to other processes on a shared machine); the target holds only if
both ratios are <= 1.3 (issue 10). Memory: one fresh process per variant (`--memory-of VARIANT`),
peak RSS during the steps (VmHWM reset after loading the model) and its excess over the
loaded model.
Writes bench/results/train_step[_quick].json.

`--padding`: what the loop gains on the CPU by computing a batch in groups of like length
(`trainer.step.grouped_loss`) instead of one padded forward. Rows of lengths evenly spread
from a quarter of the max length to all of it (the CL benchmark's rows vary about as much),
right-padded, loss on each row's second half; the JumpLoRA step timed both ways as above.
Writes bench/results/train_step_padding[_quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import add_common_args, bench_env, median, ratio, require_model, write_result
from trainer.data import IGNORE_INDEX

VARIANTS = ("jumplora", "lora-trainer", "lora-peft")
GROUPED = "jumplora-grouped"  # --padding: the JumpLoRA step with the loss in length groups
R, ALPHA, TARGETS = 8, 32.0, ["q_proj", "v_proj"]


@dataclass
class Attached:
    """A variant attached to the model: its step function and how to detach it."""

    step: Callable[[dict[str, torch.Tensor]], float]
    detach: Callable[[], None]


# The forward's precision context: none (fp32, the CPU default) or bf16 autocast as the
# trainer runs on CUDA (`torch.autocast("cuda", dtype=torch.bfloat16)`).
Amp = Callable[[], contextlib.AbstractContextManager[Any]]


def _adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, amp: Amp) -> float:
    with amp():
        loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def attach(model: torch.nn.Module, variant: str, amp: Amp = contextlib.nullcontext) -> Attached:
    """Wrap q/v of `model` with `variant` and build its optimizer as the trainer does; the
    forward runs under `amp` (the loop's autocast), the rest of the step outside it."""
    if variant == "lora-peft":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            model,
            LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0),
        )
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        return Attached(
            step=lambda batch: _adamw_step(peft_model, opt, batch, amp),
            detach=lambda: peft_model.unload(),
        )

    from trainer.adapter import Adapter
    from trainer.config import AdapterConfig
    from trainer.step import adapter_optimizer, grouped_loss, train_step

    gated = variant in ("jumplora", GROUPED)
    cfg = AdapterConfig(r=R, alpha=ALPHA, targets=TARGETS, gate="jump" if gated else "none")
    adapter = Adapter(model, cfg)
    if gated:
        with torch.no_grad():  # B = 0 at init: give dW a spread so the gate has work to do
            for m in adapter.modules.values():
                m.lora_B.normal_(0, 1e-3)
        adapter.begin_step(0.0, reinit=True)  # what the loop does at t1
    opt = adapter_optimizer(adapter, 1e-3, cfg)

    def step(batch: dict[str, torch.Tensor]) -> float:
        def task_loss() -> torch.Tensor:
            with amp():
                if variant == GROUPED:
                    return grouped_loss(model, batch)
                return model(**batch).loss

        f = 1.0 if gated else 0.0
        return train_step(adapter, opt, task_loss, f, grad_clip=1.0).loss

    return Attached(step=step, detach=adapter.unload)


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.requires_grad_(False)
    model.train()
    return model


def make_batch(
    vocab: int, batch: int, length: int, device: str = "cpu", varied: bool = False
) -> dict[str, torch.Tensor]:
    """Random tokens, (batch, length). `varied`: row lengths evenly spread from length / 4 to
    length, in random order, right-padded as the trainer's collate pads, the loss on each
    row's second half (37.5 % of the batch is padding; the CL benchmark's batches of 8 had
    24-37 %)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask, labels = torch.ones_like(ids), ids.clone()
    if varied:
        lengths = torch.linspace(length / 4, length, batch).round().long()
        lengths = lengths[torch.randperm(batch, generator=gen)]
        for row, n in enumerate(lengths.tolist()):
            mask[row, n:] = 0
            labels[row, n:] = IGNORE_INDEX
            labels[row, : n // 2] = IGNORE_INDEX
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


@dataclass
class StepTimes:
    """Seconds per timed step of each variant (wall and this process's CPU time), and each
    round's median per variant."""

    times: dict[str, list[float]]
    cpu_times: dict[str, list[float]]
    per_round: list[dict[str, float]]


def time_variants(
    model: torch.nn.Module,
    variants: list[str],
    data: dict[str, torch.Tensor],
    rounds: int,
    steps: int,
    amp: Amp = contextlib.nullcontext,
) -> StepTimes:
    """The variants in turn on one model (attach, 1 warm-up step, `steps` timed steps,
    detach), the order rotated each round. Each step ends with the loss read back
    (`.item()`), so on CUDA a step's time includes its kernels."""
    timed = StepTimes({v: [] for v in variants}, {v: [] for v in variants}, [])
    for rnd in range(rounds):
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
        this_round: dict[str, float] = {}
        for variant in order:
            attached = attach(model, variant, amp)
            try:
                attached.step(data)  # warm-up
                wall, cpu = [], []
                for _ in range(steps):
                    t, c = time.perf_counter(), time.process_time()
                    attached.step(data)
                    wall.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
            finally:
                attached.detach()
            timed.times[variant] += wall
            timed.cpu_times[variant] += cpu
            this_round[variant] = median(wall)
            print(
                f"round {rnd + 1}: {variant} {median(wall):.3f} s/step (CPU {median(cpu):.3f} s)",
                flush=True,
            )
        timed.per_round.append(this_round)
    return timed


def _status_mib(field: str) -> float:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_of(
    model_dir: Path, variant: str, batch: int, length: int, steps: int, varied: bool
) -> dict:
    """Run in a fresh process: peak RSS while `variant` trains for `steps` steps.

    Loading the checkpoint (bf16 -> fp32) has its own transient peak, so the high-water
    mark is reset after loading (`5 > /proc/self/clear_refs`) and read after the steps.
    """
    model = load_model(model_dir)
    data = make_batch(model.config.vocab_size, batch, length, varied=varied)
    Path("/proc/self/clear_refs").write_text("5")
    loaded = _status_mib("VmRSS")
    attached = attach(model, variant)
    for _ in range(steps):
        attached.step(data)
    return {
        "variant": variant,
        "model_loaded_rss_mib": loaded,
        "peak_rss_mib": _status_mib("VmHWM"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (quick: 2)")
    parser.add_argument("--max-length", type=int, default=None, help="default 128 (quick: 64)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per round: 2 (quick 1)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument(
        "--padding",
        action="store_true",
        help="rows of varied length: JumpLoRA's step padded vs in length groups (default "
        "max length 256 here, quick 64)",
    )
    parser.add_argument("--memory-of", choices=[*VARIANTS, GROUPED], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.padding and args.variants:
        parser.error("--padding times its own two steps; leave out --variants")
    require_model(args.model)
    if args.padding:  # 8 rows: room for two groups of trainer.step.MIN_GROUP_ROWS
        batch, length = args.batch_size or 8, args.max_length or (64 if args.quick else 256)
    else:
        batch = args.batch_size or (2 if args.quick else 8)
        length = args.max_length or (64 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 3)
    args.steps = args.steps or (1 if args.quick else 2)
    variants = args.variants or [v for v in VARIANTS if v != "lora-peft" or _has_peft()]
    if args.padding:
        variants = ["jumplora", GROUPED]

    if args.memory_of:  # child process of the memory measurement
        measured = memory_of(args.model, args.memory_of, batch, length, args.steps, args.padding)
        print(json.dumps(measured))
        return

    torch.manual_seed(0)
    model = load_model(args.model)
    data = make_batch(model.config.vocab_size, batch, length, varied=args.padding)
    timed = time_variants(model, variants, data, rounds, args.steps)
    times, cpu_times, per_round = timed.times, timed.cpu_times, timed.per_round
    del model

    memory = {}
    for variant in variants:
        cmd = [sys.executable, "-m", "bench.train_step", "--model", str(args.model)]
        cmd += ["--memory-of", variant, "--batch-size", str(batch), "--max-length", str(length)]
        cmd += ["--steps", str(args.steps)] + (["--padding"] if args.padding else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=bench_env())
        memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: peak RSS {memory[variant]['peak_rss_mib']:.0f} MiB", flush=True)

    rows = []
    for variant in variants:
        mem = memory[variant]
        rows.append(
            {
                "variant": variant,
                "s_per_step_median": median(times[variant]),
                "s_per_step_all": times[variant],
                "cpu_s_per_step_median": median(cpu_times[variant]),
                "cpu_s_per_step_all": cpu_times[variant],
                "peak_rss_mib": mem["peak_rss_mib"],
                "peak_over_model_mib": mem["peak_rss_mib"] - mem["model_loaded_rss_mib"],
            }
        )
    by = {r["variant"]: r for r in rows}
    ratios = {
        f"jumplora_over_{other}": {
            "step_time": ratio(by["jumplora"]["s_per_step_median"], by[other]["s_per_step_median"]),
            "cpu_time": ratio(
                by["jumplora"]["cpu_s_per_step_median"], by[other]["cpu_s_per_step_median"]
            ),
            "step_time_per_round_median": median(
                [ratio(r["jumplora"], r[other]) for r in per_round]
            ),
            "peak_rss": ratio(by["jumplora"]["peak_rss_mib"], by[other]["peak_rss_mib"]),
            "peak_over_model": ratio(
                by["jumplora"]["peak_over_model_mib"], by[other]["peak_over_model_mib"]
            ),
        }
        for other in variants
        if other != "jumplora" and "jumplora" in by
    }
    main = ratios.get("jumplora_over_lora-trainer", {})
    if args.padding:  # padded over grouped: the grouped step's speed-up
        target = {"what": "padded over length-grouped step time (above 1: groups are faster)"}
    else:
        target = {
            "max_ratio": 1.3,
            "ratio": main.get("step_time"),
            "cpu_ratio": main.get("cpu_time"),
            "met": bool(main) and max(main["step_time"], main["cpu_time"]) <= 1.3,
        }
    write_result(
        "train_step_padding" if args.padding else "train_step",
        args.quick,
        {
            "model": str(args.model),
            "settings": {
                "batch_size": batch,
                "max_length": length,
                "row_lengths": data["attention_mask"].sum(1).tolist(),
                "r": R,
                "alpha": ALPHA,
                "targets": TARGETS,
                "dtype": "float32",
                "rounds": rounds,
                "timed_steps_per_round": args.steps,
                "torch_threads": torch.get_num_threads(),
            },
            "rows": rows,
            "per_round": per_round,
            "ratios": ratios,
            "target": target,
        },
    )


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
