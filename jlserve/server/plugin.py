"""The `vllm.endpoint_plugins` entry that attaches jlserve to vLLM's OpenAI server.

vLLM builds its own app and routes; this plugin adds the admin router, the admin guard,
the version middleware and the error handler (`attach_router`, while the app is built),
then, knowing vLLM's parsed arguments, configures the guard for the address vLLM really
binds and creates the swap coordinator on the running engine (`init_state`, before the
server listens, so a restarted server is at its recorded version before it answers
anything). Every failure raises, and vLLM then refuses to start: never serve without
the admin guard or on a version other than the recorded one. It is loaded only when
named in `VLLM_PLUGINS` (`jlserve serve` sets it; under vLLM's own server the user
does). The composition root: the only module that knows both the HTTP side and the
vLLM engine adapter.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from jlserve.engine.http import add_inference_key_check
from jlserve.engine.launch import ENDPOINT_PLUGIN_NAME, WORKER_EXTENSION
from jlserve.engine.vllm_engine import VllmEngine
from jlserve.errors import ServeConfigError
from jlserve.faults import FaultStep, armed_faults, fault_point
from jlserve.jobs.routes import TrainingDispatch, build_training_app, build_worker_router
from jlserve.jobs.service import JobService
from jlserve.jobs.store import JOBS_DIR, JobStore
from jlserve.server.auth import AdminAuth, AdminAuthMiddleware
from jlserve.server.config import (
    ServeConfig,
    default_state_dir,
    read_admin_token,
    read_secret_file,
    read_training_token,
)
from jlserve.server.coordinator import SwapCoordinator, SwapSettings
from jlserve.server.errors import AdminHTTPError, admin_error_handler
from jlserve.server.metrics import JobMetrics, SwapMetrics
from jlserve.server.middleware import ModelVersionMiddleware
from jlserve.server.routes import ADMIN_PREFIX, build_admin_router
from jlserve.server.watch import DeltaWatcher

log = logging.getLogger("jlserve")
fault_point(FaultStep.PLUGIN_IMPORT)  # tests only: a plugin that cannot load


def _setup_logging() -> None:
    """vLLM configures only its own loggers; give jlserve's a handler in the same style."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("(jlserve) %(levelname)s %(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class JlserveEndpointPlugin:
    name = ENDPOINT_PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.coordinator: SwapCoordinator | None = None
        self.jobs: JobService | None = None
        self.watcher: DeltaWatcher | None = None
        self._config: ServeConfig | None = None
        self._auth = AdminAuth(configured=False)  # refuses (503) until init_state
        self._training_auth = AdminAuth(configured=False)
        self._background: set[asyncio.Task] = set()

    def attach_router(self, app: Any) -> None:
        _setup_logging()
        self._config = ServeConfig.from_env()
        faults = armed_faults()
        if faults:
            log.warning("FAULT INJECTION ARMED (%s): for tests only", faults)
        if self._config.api_key_file is not None:
            key = read_secret_file(self._config.api_key_file, "inference key")
            add_inference_key_check(app, key)
        app.add_middleware(ModelVersionMiddleware, coordinator=lambda: self.coordinator)
        app.add_middleware(AdminAuthMiddleware, auth=self._auth, prefix=ADMIN_PREFIX)
        app.add_exception_handler(AdminHTTPError, admin_error_handler)
        app.include_router(
            build_admin_router(
                lambda: self.coordinator, lambda: self.watcher and self.watcher.report()
            )
        )
        app.include_router(build_worker_router(lambda: self.jobs, self._config.max_delta_bytes))
        # Outermost: the training routes have their own token, ahead of vLLM's key check.
        limit = self._config.max_file_bytes
        training = build_training_app(lambda: self.jobs, limit)
        app.add_middleware(
            TrainingDispatch, training=training, auth=self._training_auth, max_file_bytes=limit
        )

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        config = self._config
        if engine_client is None or config is None:
            raise ServeConfigError("the jlserve plugin needs vLLM's generate server with an engine")
        if getattr(args, "api_server_count", 1) not in (None, 1):
            raise ServeConfigError(
                "jlserve needs a single API server process (--api-server-count 1)"
            )
        if getattr(args, "worker_extension_cls", None) != WORKER_EXTENSION:
            raise ServeConfigError(
                f"jlserve needs vLLM's --worker-extension-cls {WORKER_EXTENSION} "
                f"(got {getattr(args, 'worker_extension_cls', None)!r})"
            )
        host, uds = getattr(args, "host", None), getattr(args, "uds", None)
        token = read_admin_token(config, host, uds)
        model = Path(args.model)
        if not model.is_dir():
            raise ServeConfigError(
                f"--model {args.model}: jlserve needs a local checkpoint directory"
            )
        if token is None:
            log.warning("admin routes are NOT authenticated (--insecure-admin on %s)", host)
        # The coordinator's tensor work is small gathers, scatters and sorts; torch's
        # intra-op threads make them 20-70x slower here whenever the engine keeps the
        # cores busy (measured: a 10-delta replay at 1.5 B, 29 s -> 1.8 s). The API server
        # runs no model, so one thread costs nothing. (Hashing uses its own threads.)
        torch.set_num_threads(1)
        self.coordinator = await SwapCoordinator.open(
            VllmEngine(engine_client, call_timeout_s=config.engine_timeout_s),
            model_dir=model.resolve(),
            state_dir=config.state_dir or default_state_dir(model),
            settings=SwapSettings(
                config.swap_policy, config.drain_timeout_s, config.drain_timeout_action
            ),
            metrics=SwapMetrics(),
            max_delta_bytes=config.max_delta_bytes,
            rehash_base=config.rehash_base,
        )
        state_dir = self.coordinator.store_root
        served_names = getattr(args, "served_model_name", None) or [args.model]
        self.jobs = JobService(
            JobStore(config.jobs_dir or state_dir / JOBS_DIR),
            self.coordinator,
            served_names[0],
            JobMetrics(),
            lease_s=config.job_lease_s,
        )
        await self.jobs.open()
        self._training_auth.configure(read_training_token(config, token))
        self._auth.configure(token)
        if config.watch_dir is not None:
            self.watcher = DeltaWatcher(config.watch_dir, self.coordinator, config.watch_interval_s)
            # Catch up with the folder before listening: a replica (re)started behind its
            # feed must not pass /health, and take traffic, on an old version.
            try:
                await self.watcher.scan_once()
            except Exception:  # as in the watcher's loop: a folder problem is not fatal
                log.exception("watch %s: first scan failed", config.watch_dir)
            task = asyncio.create_task(self.watcher.run(), name="jlserve-watch")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
