"""Bearer-token check of the admin routes, independent of vLLM's inference `--api-key`."""

from __future__ import annotations

import hashlib
import hmac

from jlserve.server.errors import AdminHTTPError


class AdminAuth:
    """`token=None` means the explicit insecure loopback mode (checked at startup)."""

    def __init__(self, token: str | None) -> None:
        self._digest = None if token is None else hashlib.sha256(token.encode()).digest()

    def check(self, authorization: str | None) -> None:
        """Raise 401 without a bearer token and 403 with a wrong one.

        Both sides are hashed first so the comparison is constant-time and independent
        of the token's length; the token itself is never logged or echoed.
        """
        if self._digest is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AdminHTTPError(401, "unauthorized", "admin route: missing bearer token")
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._digest):
            raise AdminHTTPError(403, "forbidden", "admin route: wrong admin token")
