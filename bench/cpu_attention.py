"""CPU attention kernel: what keeping vLLM off its AMX attention costs, on a CPU with AMX.

    .venv/bin/python -m bench.cpu_attention           # SmolLM2 bf16, 7 repeats (~5 min)
    .venv/bin/python -m bench.cpu_attention --quick   # 3 repeats

`jlserve serve` twice on the same checkpoint in its bf16, both up at once, requests one at
a time and alternating between them (the first server of each pair alternates too):
- `default`: jlserve's choice, vLLM's AVX-512 attention kernel (jlserve.engine.cpu_attention);
- `amx`: `JLSERVE_CPU_AMX_ATTENTION=1`, vLLM 0.32's AMX attention kernel (it crashed after
  a weight reload on such CPUs, so it is measured here without swaps).
Per repeat: a prefill of each prompt length (max_tokens 1: seconds to the answer) and a
decode (the fixed bench prompt, 64 tokens, EOS ignored: tokens/s). Medians over repeats;
ratios are default over amx (time ratio > 1: the default is slower; tokens/s ratio < 1:
the default is slower). On a CPU without AMX both servers run the same kernel: the script
says so and writes nothing. Writes bench/results/cpu_attention[_quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import (
    LOGS,
    PROMPT,
    Server,
    add_common_args,
    jlserve_server,
    median,
    ratio,
    require_model,
    write_result,
)
from jlserve.engine.cpu_attention import KEEP_AMX_ENV, SWITCH_MESSAGE

KERNELS = ("default", "amx")
MAX_MODEL_LEN = 2048
# prefix caching off: every repeat of a prompt must compute its prefill again
ENGINE_ARGS = (
    "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--max-num-seqs", "8",
    "--no-enable-prefix-caching",
)  # fmt: skip
SENTENCE_TOKENS = 14  # SmolLM2's tokenizer on SENTENCE
DECODE_TOKENS = 64
SENTENCE = "The committee met on Tuesday to review the budget for the coming year. "


def start_servers(model: Path, work: Path, stack: contextlib.ExitStack) -> dict[str, Server]:
    """Both servers, up and answering; `stack` stops them, also when one fails to start.
    Each must have run the kernel it stands for (told by jlserve's log line in the worker)."""
    servers = {}
    for kernel in KERNELS:
        log = LOGS / f"cpu_attention_{kernel}.log"
        log.unlink(missing_ok=True)  # logs are appended: this run's lines only
        keep_amx = {KEEP_AMX_ENV: "1" if kernel == "amx" else "0"}
        server = jlserve_server(model, work / kernel, log, ENGINE_ARGS, kernel, env=keep_amx)
        servers[kernel] = server.start()
        stack.callback(server.stop)
    for kernel, server in servers.items():
        server.wait_first_completion()
        if (SWITCH_MESSAGE in server.log_path.read_text()) != (kernel == "default"):
            raise RuntimeError(f"the {kernel} server did not run its kernel: {server.log_path}")
    return servers


def timed_completion(http: httpx.Client, server: Server, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": server.model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    r = http.post(f"{server.url}/v1/completions", json=body)
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    usage = r.json()["usage"]
    return {
        "s": elapsed,
        "prompt_tokens": usage["prompt_tokens"],
        "tokens": usage["completion_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (quick: 3)")
    parser.add_argument(
        "--prompt-sentences", type=int, nargs="+", default=[16, 120],
        help="prompt lengths, in sentences of ~14 tokens (default 16 120: ~220 and ~1700)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    longest = (MAX_MODEL_LEN - 64) // SENTENCE_TOKENS
    if not all(1 <= n <= longest for n in args.prompt_sentences):
        parser.error(f"--prompt-sentences must be between 1 and {longest} (--max-model-len 2048)")
    require_model(args.model)
    if not torch.cpu._is_amx_tile_supported():
        sys.exit("this CPU has no AMX tiles: vLLM never takes its AMX attention here")
    repeats = args.repeats or (3 if args.quick else 7)
    prompts = {n: SENTENCE * n for n in args.prompt_sentences}

    samples: dict[str, dict[str, list[dict]]] = {k: {} for k in KERNELS}
    with (
        tempfile.TemporaryDirectory(prefix="bench-cpu-attention-") as tmp,
        contextlib.ExitStack() as stack,
        httpx.Client(timeout=600) as http,
    ):
        servers = start_servers(args.model, Path(tmp), stack)
        for rep in range(repeats):
            for kernel in KERNELS if rep % 2 == 0 else KERNELS[::-1]:
                server = servers[kernel]
                for n, prompt in prompts.items():
                    one = timed_completion(http, server, prompt, 1)
                    samples[kernel].setdefault(f"prefill_{n}", []).append(one)
                one = timed_completion(http, server, PROMPT, DECODE_TOKENS)
                samples[kernel].setdefault("decode", []).append(one)
            print(f"repeat {rep + 1}/{repeats} done; load {os.getloadavg()}", flush=True)

    results: dict[str, Any] = {}
    for kernel in KERNELS:
        row: dict[str, Any] = {}
        for n in prompts:
            runs = samples[kernel][f"prefill_{n}"]
            row[f"prefill_{n}"] = {
                "prompt_tokens": runs[0]["prompt_tokens"],
                "median_s": median([r["s"] for r in runs]),
            }
        row["decode_tok_per_s"] = median([r["tokens"] / r["s"] for r in samples[kernel]["decode"]])
        results[kernel] = row
    default, amx = results["default"], results["amx"]
    ratios = {
        f"prefill_{n}_time": ratio(
            default[f"prefill_{n}"]["median_s"], amx[f"prefill_{n}"]["median_s"]
        )
        for n in prompts
    }
    ratios["decode_tok_per_s"] = ratio(default["decode_tok_per_s"], amx["decode_tok_per_s"])
    path = write_result(
        "cpu_attention",
        args.quick,
        {
            "model": str(args.model),
            "repeats": repeats,
            "decode_tokens": DECODE_TOKENS,
            "engine_args": list(ENGINE_ARGS),
            "kernels": results,
            "ratios_default_over_amx": ratios,
            "load_average_end": os.getloadavg(),
        },
    )
    print(f"{ratios}\nwrote {path}")


if __name__ == "__main__":
    main()
