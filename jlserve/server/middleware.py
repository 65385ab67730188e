"""ASGI middleware: hold inference requests during a swap, and label every response.

Inference requests pass the coordinator's gate before reaching vLLM: while a swap runs
they wait here (nothing is dropped), and the version they are admitted under is the one
that serves them under the drain policy, because the swap waits for every admitted
request to finish. Every response carries `x-jlserve-model-version`. Pure ASGI (not
BaseHTTPMiddleware) so streamed responses pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jlserve.server.coordinator import SwapCoordinator
from jlserve.server.schemas import VERSION_HEADER

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
        gated = not path.startswith(UNGATED_PREFIXES)
        if gated:
            await coordinator.gate.admit()
        admitted_version = coordinator.version

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                version = admitted_version if gated else coordinator.version
                MutableHeaders(scope=message).append(VERSION_HEADER, str(version))
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            if gated:
                coordinator.gate.release()
