"""The admin guard in isolation: which paths it covers, that it answers before the body is
read, and that the token comparison is constant-time (on equal-length digests)."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from jlserve.server import auth
from jlserve.server.auth import AdminAuth, AdminAuthMiddleware
from jlserve.server.errors import AdminHTTPError

TOKEN = "the-right-token-0123456789"


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    bodies_read: list[bytes] = []

    @app.post("/admin/echo")
    async def echo(request: Request) -> dict:
        bodies_read.append(await request.body())
        return {"ok": True}

    @app.get("/administrator")
    async def lookalike() -> dict:
        return {"ok": True}

    app.add_middleware(AdminAuthMiddleware, auth=AdminAuth(TOKEN), prefix="/admin")
    test_client = TestClient(app)
    test_client.bodies_read = bodies_read  # type: ignore[attr-defined]
    return test_client


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/echo", "/admin/unknown/deep"])
def test_every_path_under_the_prefix_is_guarded(client, path):
    r = client.post(path, content=b"body")
    assert r.status_code == 401
    assert r.json() == {
        "error": {"type": "unauthorized", "message": "admin route: missing bearer token"}
    }
    assert client.bodies_read == []  # refused before the route (and its body) ran


def test_right_token_passes_and_lookalike_paths_are_not_admin(client):
    ok = client.post("/admin/echo", content=b"body", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and client.bodies_read == [b"body"]
    assert client.get("/administrator").status_code == 200


def test_token_comparison_is_constant_time(monkeypatch):
    """Every check goes through `hmac.compare_digest` on two sha256 digests, so neither
    the content nor the length of a wrong token changes how long the comparison takes."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    guard = AdminAuth(TOKEN)
    for given in (TOKEN, "x", TOKEN[:-1], TOKEN + "x" * 100):
        with contextlib.suppress(AdminHTTPError):  # wrong ones are refused; not the point
            guard.check(f"Bearer {given}")
    assert len(calls) == 4
    expected = hashlib.sha256(TOKEN.encode()).digest()
    assert all(len(a) == len(b) == 32 and b == expected for a, b in calls)
