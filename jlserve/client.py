"""Client of the admin API, used by `jlserve update|status|rollback`.

URL and token come from flags or the environment (`JLSERVE_URL`,
`JLSERVE_ADMIN_TOKEN_FILE`, `JLSERVE_ADMIN_TOKEN`), so scripts need not repeat them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from jlserve.errors import AdminRequestError, ServerUnreachableError
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
        return self.update_bytes(read_delta_bytes(delta_file))

    def update_bytes(self, data: bytes) -> UpdateResponse:
        return self._call("POST", "/admin/deltas", UpdateResponse, content=data)

    def status(self) -> StatusResponse:
        return self._call("GET", "/admin/status", StatusResponse)

    def rollback(self, to_version: int) -> UpdateResponse:
        body = RollbackRequest(to_version=to_version).model_dump()
        return self._call("POST", "/admin/rollback", UpdateResponse, json=body)

    def _call(self, method: str, path: str, model: type[Response], **kwargs: object) -> Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"{self.url}: cannot reach the server ({exc})") from None
        except httpx.HTTPError as exc:
            raise AdminRequestError(f"{self.url}: request failed ({exc})") from None
        if response.status_code != 200:
            raise AdminRequestError(
                f"server refused ({response.status_code}): {_message(response)}"
            )
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise AdminRequestError(f"{self.url}{path}: unexpected answer ({exc})") from None


def read_delta_bytes(delta_file: Path) -> bytes:
    try:
        return Path(delta_file).read_bytes()
    except OSError as exc:
        raise AdminRequestError(f"{delta_file}: cannot read delta file ({exc})") from None


@dataclass
class ReplicaOutcome:
    """What one replica of a fleet did with an update."""

    url: str
    result: UpdateResponse | None = None  # set when the replica applied the delta
    error: str | None = None  # set when it refused or could not be reached
    rolled_back_to: int | None = None  # set when it was returned to its previous version
    rollback_error: str | None = None  # set when that return failed: versions are mixed


def update_fleet(
    urls: Sequence[str], token: str | None, delta_file: Path, *, rollback_on_failure: bool = True
) -> list[ReplicaOutcome]:
    """Apply one delta to several replicas behind a load balancer, one after another.

    A replica that fails stops the rollout. With `rollback_on_failure` (the default) the
    replicas already updated are rolled back to their previous version, so the fleet
    is never left at mixed versions silently: every outcome says what happened, and a
    rollback that fails is reported as such.
    """
    data = read_delta_bytes(delta_file)
    outcomes: list[ReplicaOutcome] = []
    for url in urls:
        outcome = ReplicaOutcome(url)
        outcomes.append(outcome)
        try:
            with AdminClient(url, token) as client:
                outcome.result = client.update_bytes(data)
        except AdminRequestError as exc:
            outcome.error = str(exc)
            break
    failed = any(o.error for o in outcomes)
    if failed and rollback_on_failure:
        for outcome in outcomes:
            if outcome.result is None:
                continue
            try:
                with AdminClient(outcome.url, token) as client:
                    client.rollback(outcome.result.previous_version)
                outcome.rolled_back_to = outcome.result.previous_version
            except AdminRequestError as exc:
                outcome.rollback_error = str(exc)
    return outcomes


def _message(response: httpx.Response) -> str:
    """The server's error message, whichever JSON error shape (jlserve's or vLLM's) it used."""
    try:
        return ErrorBody.model_validate_json(response.content).error.message
    except ValidationError:
        return response.text.strip()[:500] or response.reason_phrase
