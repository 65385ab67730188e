"""Bearer-token check of the admin routes, independent of vLLM's inference `--api-key`.

The check is ASGI middleware in front of every path under the admin prefix, not a route
dependency: it runs before routing and before any body is read, so an unauthenticated
client can neither make the server buffer an upload nor learn which admin routes exist
or how their bodies are validated, and an admin route added later is guarded too.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from jlserve.server.errors import AdminHTTPError, error_response


class AdminAuth:
    """`token=None` means the explicit insecure loopback mode (checked at startup).

    The plugin installs the guard before it knows vLLM's bind address: an auth made with
    `configured=False` refuses every admin request (503) until `configure` is called.
    """

    def __init__(self, token: str | None = None, *, configured: bool = True) -> None:
        self._configured = False
        self._digest: bytes | None = None
        if configured:
            self.configure(token)

    def configure(self, token: str | None) -> None:
        self._digest = None if token is None else hashlib.sha256(token.encode()).digest()
        self._configured = True

    def check(self, authorization: str | None) -> None:
        """Raise 401 without a bearer token and 403 with a wrong one.

        Both sides are hashed first so the comparison is constant-time and independent
        of the token's length; the token itself is never logged or echoed.
        """
        if not self._configured:
            raise AdminHTTPError(503, "starting", "admin routes are not configured yet")
        if self._digest is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AdminHTTPError(401, "unauthorized", "admin route: missing bearer token")
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._digest):
            raise AdminHTTPError(403, "forbidden", "admin route: wrong admin token")


class AdminAuthMiddleware:
    """Refuse every request under `prefix` (the path itself or below it) without the token."""

    def __init__(self, app: ASGIApp, auth: AdminAuth, prefix: str) -> None:
        self.app = app
        self._auth = auth
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path == self._prefix or path.startswith(self._prefix + "/"):
                try:
                    self._auth.check(Headers(scope=scope).get("authorization"))
                except AdminHTTPError as exc:
                    await error_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
