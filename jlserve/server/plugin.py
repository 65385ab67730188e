"""The `vllm.endpoint_plugins` entry that attaches jlserve to vLLM's OpenAI server.

vLLM builds its own app and routes; this plugin adds the admin router, the version
middleware and the error handler (`attach_router`, while the app is built), then creates
the swap coordinator on the running engine (`init_state`, before the server listens, so
a restarted server is at its latest version before it answers anything). It is loaded
only when named in `VLLM_PLUGINS`, which `jlserve serve` sets. The composition root:
the only module that knows both the HTTP side and the vLLM engine adapter.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from argparse import Namespace
from typing import Any

from jlserve.engine.launch import ENDPOINT_PLUGIN_NAME
from jlserve.engine.vllm_engine import VllmEngine
from jlserve.errors import ServeConfigError
from jlserve.faults import armed_faults
from jlserve.server.auth import AdminAuth, AdminAuthMiddleware
from jlserve.server.config import ServeConfig, read_admin_token
from jlserve.server.coordinator import SwapCoordinator
from jlserve.server.errors import AdminHTTPError, admin_error_handler
from jlserve.server.metrics import SwapMetrics
from jlserve.server.middleware import ModelVersionMiddleware
from jlserve.server.routes import ADMIN_PREFIX, build_admin_router
from jlserve.server.watch import DeltaWatcher

log = logging.getLogger("jlserve")


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
        self._config: ServeConfig | None = None
        self._background: set[asyncio.Task] = set()

    def attach_router(self, app: Any) -> None:
        # Errors here propagate and stop the server: never serve without the admin guard.
        _setup_logging()
        self._config = ServeConfig.from_env()
        auth = AdminAuth(read_admin_token(self._config))
        if self._config.admin_token_file is None:
            log.warning(
                "admin routes are NOT authenticated (--insecure-admin on %s)", self._config.host
            )
        faults = armed_faults()
        if faults:
            log.warning("FAULT INJECTION ARMED (%s): for tests only", faults)
        app.add_middleware(ModelVersionMiddleware, coordinator=lambda: self.coordinator)
        app.add_middleware(AdminAuthMiddleware, auth=auth, prefix=ADMIN_PREFIX)
        app.add_exception_handler(AdminHTTPError, admin_error_handler)
        app.include_router(build_admin_router(lambda: self.coordinator))

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        config = self._config
        if engine_client is None or config is None:
            raise ServeConfigError("the jlserve plugin needs vLLM's generate server with an engine")
        if getattr(args, "api_server_count", 1) not in (None, 1):
            raise ServeConfigError(
                "jlserve needs a single API server process (--api-server-count 1)"
            )
        self.coordinator = await SwapCoordinator.open(
            VllmEngine(engine_client),
            model_dir=config.model,
            state_dir=config.state_dir,
            policy=config.swap_policy,
            metrics=SwapMetrics(),
            max_delta_bytes=config.max_delta_bytes,
        )
        if config.watch_dir is not None:
            watcher = DeltaWatcher(config.watch_dir, self.coordinator, config.watch_interval_s)
            task = asyncio.create_task(watcher.run(), name="jlserve-watch")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
