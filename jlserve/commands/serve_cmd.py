"""`jlserve serve`: vLLM's OpenAI server on a checkpoint, with live delta updates.

Checks every jlserve flag first (an unusable admin setup is refused before vLLM spends
seconds loading), then replaces this process with vLLM's server, which loads jlserve's
endpoint plugin and worker extension (see jlserve.engine.launch).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from jlserve.checkpoint import weight_files
from jlserve.delta.format import DEFAULT_MAX_FILE_BYTES
from jlserve.engine.launch import exec_vllm_server, vllm_server_argv, vllm_server_env
from jlserve.engine.protocol import SwapPolicy
from jlserve.server.config import ServeConfig, read_admin_token

API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own variable: keeps the key out of `ps` output


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model with vLLM's OpenAI API and live delta updates",
        description=__doc__.splitlines()[0],
    )
    serve.add_argument("--model", type=Path, required=True, help="base HF checkpoint directory")
    serve.add_argument(
        "--state-dir",
        type=Path,
        help="where applied deltas and versions are kept (default: under $XDG_STATE_HOME/jlserve)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="key for the inference routes (vLLM's --api-key)")
    serve.add_argument("--admin-token-file", type=Path, help="file holding the admin bearer token")
    serve.add_argument(
        "--insecure-admin",
        action="store_true",
        help="no admin token; only allowed on a loopback --host",
    )
    serve.add_argument("--watch", type=Path, help="apply delta files that appear in this directory")
    serve.add_argument(
        "--swap-policy",
        choices=[p.value for p in SwapPolicy],
        default=SwapPolicy.DRAIN.value,
        help="drain: running requests finish on the old version first; preempt: swap at once",
    )
    serve.add_argument(
        "--max-delta-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_FILE_BYTES,
        help=f"largest delta upload accepted, in bytes (default {DEFAULT_MAX_FILE_BYTES}: 2 GiB)",
    )
    serve.add_argument(
        "--cpu-dense-weights",
        action="store_true",
        help="CPU only, for tests: keep linear weights dense so the GPU in-place path is used",
    )
    serve.add_argument(
        "vllm_args", nargs="*", metavar="-- VLLM_ARGS", help="extra vLLM engine args"
    )
    serve.set_defaults(func=_serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def default_state_dir(model: Path) -> Path:
    """One state dir per model path, so two models never share versions by accident."""
    root = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "jlserve"
    resolved = model.resolve()
    return root / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"


def _serve(args: argparse.Namespace) -> int:
    weight_files(args.model)  # fail fast on a directory that is not a checkpoint
    config = ServeConfig(
        model=args.model.resolve(),
        state_dir=(args.state_dir or default_state_dir(args.model)).resolve(),
        host=args.host,
        admin_token_file=args.admin_token_file.resolve() if args.admin_token_file else None,
        insecure_admin=args.insecure_admin,
        watch_dir=args.watch.resolve() if args.watch else None,
        swap_policy=SwapPolicy(args.swap_policy),
        max_delta_bytes=args.max_delta_bytes,
    )
    read_admin_token(config)  # refuse now rather than after the engine loaded
    import torch  # vLLM imports it anyway; only to know whether a GPU is there

    on_cpu = not torch.cuda.is_available()
    argv = vllm_server_argv(config.model, args.host, args.port, args.vllm_args, on_cpu=on_cpu)
    extra_env = config.to_env() | ({API_KEY_ENV: args.api_key} if args.api_key else {})
    env = vllm_server_env(os.environ, extra_env, cpu_dense=args.cpu_dense_weights, on_cpu=on_cpu)
    exec_vllm_server(argv, env)
