"""ASGI middleware: hold inference requests during a swap, label every response, and
fail `/health` while the server is degraded.

Inference requests pass the coordinator's gate before reaching vLLM: while a swap runs
they wait here (nothing is dropped), and the version they are admitted under is the one
that serves them under the drain policy, because the swap waits for every admitted
request to finish. Every response carries `x-jlserve-model-version` and
`x-jlserve-model-fingerprint`. A degraded server (engine weights unknown, or the engine
died) answers `/health` with 503 and the reason, so an orchestrator restarts it. Pure
ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jlserve.server.coordinator import SwapCoordinator
from jlserve.server.errors import AdminHTTPError, error_response
from jlserve.server.schemas import FINGERPRINT_HEADER, VERSION_HEADER

HEALTH_PATH = "/health"

# Routes that never touch the model weights: not held during a swap.
UNGATED_PREFIXES = (
    "/admin",
    "/health",
    "/metrics",
    "/ping",
    "/version",
    "/load",
    "/v1/models",
    "/docs",
    "/redoc",
    "/openapi.json",
)


class ModelVersionMiddleware:
    def __init__(self, app: ASGIApp, coordinator: Callable[[], SwapCoordinator | None]) -> None:
        self.app = app
        self._coordinator = coordinator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        coordinator = self._coordinator()
        if scope["type"] != "http" or coordinator is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == HEALTH_PATH and (reason := coordinator.degraded):
            await error_response(AdminHTTPError(503, "degraded", reason))(scope, receive, send)
            return
        gated = not path.startswith(UNGATED_PREFIXES)
        if gated:
            await coordinator.gate.admit()
        admitted = (coordinator.version, coordinator.fingerprint)

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                version, fingerprint = (
                    admitted if gated else (coordinator.version, coordinator.fingerprint)
                )
                headers = MutableHeaders(scope=message)
                headers.append(VERSION_HEADER, str(version))
                headers.append(FINGERPRINT_HEADER, fingerprint)
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            if gated:
                coordinator.gate.release()
