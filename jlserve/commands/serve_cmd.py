"""`jlserve serve`: vLLM's OpenAI server on a checkpoint, with live delta updates.

Checks every jlserve flag first (an unusable admin setup is refused before vLLM spends
seconds loading), then replaces this process with vLLM's server, which loads jlserve's
endpoint plugin and worker extension (see jlserve.engine.launch). No secret travels on
the command line or in the environment: the plugin reads the token and key files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jlserve.commands import positive_int
from jlserve.errors import ServeConfigError
from jlserve.vocab import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DrainTimeoutAction,
    SwapPolicy,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model with vLLM's OpenAI API and live delta updates",
        description=__doc__.splitlines()[0],
    )
    serve.add_argument("--model", type=Path, required=True, help="base HF checkpoint directory")
    serve.add_argument(
        "--served-model-name",
        help="the model name clients use (default: the checkpoint folder's name)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        help="where applied deltas and versions are kept (default: under $XDG_STATE_HOME/jlserve)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the key of the inference routes (vLLM's key check)",
    )
    serve.add_argument("--admin-token-file", type=Path, help="file holding the admin bearer token")
    serve.add_argument(
        "--insecure-admin",
        action="store_true",
        help="no admin token; only allowed on a loopback --host",
    )
    serve.add_argument(
        "--watch", type=Path, help="apply delta files that appear in this directory (read only)"
    )
    serve.add_argument(
        "--swap-policy",
        choices=[p.value for p in SwapPolicy],
        default=SwapPolicy.DRAIN.value,
        help="drain: running requests finish on the old version first; preempt: swap at once",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a drain waits for running requests (default 30)",
    )
    serve.add_argument(
        "--drain-timeout-action",
        choices=[a.value for a in DrainTimeoutAction],
        default=DrainTimeoutAction.REFUSE.value,
        help="past the drain timeout: refuse the update (nothing changes) or preempt",
    )
    serve.add_argument(
        "--engine-timeout",
        type=_positive_float,
        default=300.0,
        help="seconds any engine call of a swap may take before the swap fails (default 300)",
    )
    serve.add_argument(
        "--max-delta-bytes",
        type=positive_int,
        default=DEFAULT_MAX_FILE_BYTES,
        help=f"largest delta upload accepted, in bytes (default {DEFAULT_MAX_FILE_BYTES}: 2 GiB)",
    )
    serve.add_argument(
        "--rehash-base",
        action="store_true",
        help="re-hash the whole base checkpoint instead of trusting the state dir's digest "
        "cache (which is keyed by each file's size, mtime and header)",
    )
    jobs = serve.add_argument_group("fine-tuning jobs (docs/jobs.md)")
    jobs.add_argument(
        "--training-token-file",
        type=Path,
        help="file holding the bearer token of /v1/files and /v1/fine_tuning "
        "(default: the admin token)",
    )
    jobs.add_argument(
        "--jobs-dir",
        type=Path,
        help="where the jobs' database and files live (default: STATE_DIR/jobs)",
    )
    jobs.add_argument(
        "--max-file-bytes",
        type=positive_int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        help=f"largest training file upload, in bytes (default {DEFAULT_MAX_UPLOAD_BYTES}: 512 MiB)",
    )
    jobs.add_argument(
        "--job-lease",
        type=_lease_seconds,
        default=DEFAULT_LEASE_S,
        help=f"seconds a worker may go without renewing its job's lease before the job is "
        f"failed (default {DEFAULT_LEASE_S:g})",
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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _lease_seconds(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {text}")
    return value


def _serve(args: argparse.Namespace) -> int:
    # Heavy imports only when serving, so the admin commands stay light.
    from jlserve.engine.launch import (
        engine_runs_on_cpu,
        exec_vllm_server,
        vllm_server_argv,
        vllm_server_env,
    )
    from jlserve.server.config import (
        ServeConfig,
        default_state_dir,
        read_admin_token,
        read_secret_file,
        read_training_token,
    )
    from jlserve.weight_files import weight_files

    weight_files(args.model)  # fail fast on a directory that is not a checkpoint
    if os.environ.get("VLLM_API_KEY"):
        raise ServeConfigError(
            "VLLM_API_KEY is set: jlserve serve keeps secrets out of process environments; "
            "unset it and pass --api-key-file FILE"
        )
    config = ServeConfig(
        state_dir=(args.state_dir or default_state_dir(args.model)).resolve(),
        admin_token_file=args.admin_token_file.resolve() if args.admin_token_file else None,
        insecure_admin=args.insecure_admin,
        api_key_file=args.api_key_file.resolve() if args.api_key_file else None,
        watch_dir=args.watch.resolve() if args.watch else None,
        swap_policy=SwapPolicy(args.swap_policy),
        drain_timeout_s=args.drain_timeout,
        drain_timeout_action=DrainTimeoutAction(args.drain_timeout_action),
        engine_timeout_s=args.engine_timeout,
        max_delta_bytes=args.max_delta_bytes,
        rehash_base=args.rehash_base,
        training_token_file=(
            args.training_token_file.resolve() if args.training_token_file else None
        ),
        jobs_dir=args.jobs_dir.resolve() if args.jobs_dir else None,
        max_file_bytes=args.max_file_bytes,
        job_lease_s=args.job_lease,
    )
    admin_token = read_admin_token(config, args.host)  # refuse now, not after the engine loaded
    read_training_token(config, admin_token)
    if config.api_key_file is not None:
        read_secret_file(config.api_key_file, "inference key")
    on_cpu = engine_runs_on_cpu()
    model = args.model.resolve()
    name = args.served_model_name or model.name
    argv = vllm_server_argv(
        model,
        name,
        args.host,
        args.port,
        args.vllm_args,
        on_cpu=on_cpu,
        state_dir=config.state_dir,
    )
    env = vllm_server_env(
        os.environ, config.to_env(), cpu_dense=args.cpu_dense_weights, on_cpu=on_cpu
    )
    exec_vllm_server(argv, env)
