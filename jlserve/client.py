"""Client of the admin API, used by `jlserve update|status|rollback`.

URL and token come from flags or the environment (`JLSERVE_URL`,
`JLSERVE_ADMIN_TOKEN_FILE`, `JLSERVE_ADMIN_TOKEN`), so scripts need not repeat them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from jlserve.errors import AdminRequestError
from jlserve.server.schemas import ErrorBody, RollbackRequest, StatusResponse, UpdateResponse

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "JLSERVE_URL"
TOKEN_FILE_ENV = "JLSERVE_ADMIN_TOKEN_FILE"
TOKEN_ENV = "JLSERVE_ADMIN_TOKEN"

Response = TypeVar("Response", bound=BaseModel)


def resolve_token(token_file: Path | None, env: Mapping[str, str] = os.environ) -> str | None:
    """Token from the flag's file, else `JLSERVE_ADMIN_TOKEN_FILE`, else `JLSERVE_ADMIN_TOKEN`."""
    path = token_file or (Path(env[TOKEN_FILE_ENV]) if env.get(TOKEN_FILE_ENV) else None)
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise AdminRequestError(f"{path}: cannot read admin token ({exc})") from None
    return env.get(TOKEN_ENV) or None


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout_s: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.url = url

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def update(self, delta_file: Path) -> UpdateResponse:
        try:
            data = Path(delta_file).read_bytes()
        except OSError as exc:
            raise AdminRequestError(f"{delta_file}: cannot read delta file ({exc})") from None
        return self._call("POST", "/admin/deltas", UpdateResponse, content=data)

    def status(self) -> StatusResponse:
        return self._call("GET", "/admin/status", StatusResponse)

    def rollback(self, to_version: int) -> UpdateResponse:
        body = RollbackRequest(to_version=to_version).model_dump()
        return self._call("POST", "/admin/rollback", UpdateResponse, json=body)

    def _call(self, method: str, path: str, model: type[Response], **kwargs: object) -> Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminRequestError(f"{self.url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise AdminRequestError(
                f"server refused ({response.status_code}): {_message(response)}"
            )
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise AdminRequestError(f"{self.url}{path}: unexpected answer ({exc})") from None


def _message(response: httpx.Response) -> str:
    """The server's error message, whichever JSON error shape (jlserve's or vLLM's) it used."""
    try:
        return ErrorBody.model_validate_json(response.content).error.message
    except ValidationError:
        return response.text.strip()[:500] or response.reason_phrase
