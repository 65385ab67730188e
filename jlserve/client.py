"""Client of the admin API, used by `jlserve update|status|rollback`.

URL and token come from flags or the environment (`JLSERVE_URL`,
`JLSERVE_ADMIN_TOKEN_FILE`, `JLSERVE_ADMIN_TOKEN`), so scripts need not repeat them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from jlserve.errors import AdminRequestError, ServerUnreachableError
from jlserve.server.schemas import (
    IF_MATCH_HEADER,
    ApplyResponse,
    ErrorBody,
    RollbackRequest,
    RollbackResponse,
    StatusResponse,
)

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "JLSERVE_URL"
TOKEN_FILE_ENV = "JLSERVE_ADMIN_TOKEN_FILE"
TOKEN_ENV = "JLSERVE_ADMIN_TOKEN"
DEFAULT_TIMEOUT_S = 600.0
STATUS_TIMEOUT_S = 30.0
RESEND_TIMEOUT_S = 60.0  # after a timeout, how long the same delta sent again may take

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


def delta_child_fingerprint(data: bytes) -> str | None:
    """The child fingerprint a delta file declares, read from its safetensors header
    alone (no torch); None if the bytes do not look like a delta. The server validates
    the file fully: this is only for a client to recognise its delta's outcome."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        child = json.loads(header["__metadata__"]["jlserve.delta"])["child_fingerprint"]
    except (struct.error, ValueError, KeyError, TypeError):
        return None
    return child if isinstance(child, str) else None


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.url = url
        self.timeout_s = timeout_s

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def update(self, delta_file: Path, if_match: str | None = None) -> ApplyResponse:
        return self.update_bytes(read_delta_bytes(delta_file), if_match)

    def update_bytes(self, data: bytes, if_match: str | None = None) -> ApplyResponse:
        """Apply a delta. If no answer comes in time, the outcome is learned by fingerprint
        (see `_send_again`)."""
        headers = {IF_MATCH_HEADER: if_match} if if_match else {}
        try:
            return self._call("POST", "/admin/deltas", ApplyResponse, content=data, headers=headers)
        except httpx.TimeoutException:
            return self._send_again(data, headers)

    def _send_again(self, data: bytes, headers: dict[str, str]) -> ApplyResponse:
        """After a timeout the first request may or may not have been applied. The same
        delta sent again waits behind it and is answered by fingerprint: `applied:
        false` when its child is already served (the first request did it), a fresh
        apply when it was not applied, a refusal naming the served model otherwise."""
        waited = f"no answer within {self.timeout_s:g} s"
        try:
            result = self._call(
                "POST",
                "/admin/deltas",
                ApplyResponse,
                content=data,
                headers=headers,
                timeout=max(self.timeout_s, RESEND_TIMEOUT_S),
            )
        except httpx.TimeoutException:
            raise ServerUnreachableError(
                f"{self.url}: {waited}, nor to the same delta sent again; the outcome is "
                f"unknown: `jlserve status` shows whether {delta_child_fingerprint(data)} is served"
            ) from None
        except AdminRequestError as exc:
            raise AdminRequestError(f"{self.url}: {waited}; sent again: {exc}") from None
        how = (
            "applied now (the first request had not applied it)"
            if result.applied
            else "its model was already served (the first request applied it)"
        )
        return result.model_copy(update={"note": f"{waited}; sent again: {how}"})

    def status(self, timeout_s: float = STATUS_TIMEOUT_S) -> StatusResponse:
        return self._call("GET", "/admin/status", StatusResponse, timeout=timeout_s)

    def rollback(
        self,
        to_version: int | None = None,
        to_fingerprint: str | None = None,
        if_match: str | None = None,
    ) -> RollbackResponse:
        try:
            body = RollbackRequest(to_version=to_version, to_fingerprint=to_fingerprint)
        except ValidationError as exc:
            raise AdminRequestError(f"rollback: {exc.errors()[0]['msg']}") from None
        headers = {IF_MATCH_HEADER: if_match} if if_match else {}
        return self._call(
            "POST",
            "/admin/rollback",
            RollbackResponse,
            json=body.model_dump(exclude_none=True),
            headers=headers,
        )

    def _call(self, method: str, path: str, model: type[Response], **kwargs: object) -> Response:
        """One request whose 200 answer is `model`; see `_send` for failures."""
        response = self._send(method, path, **kwargs)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise AdminRequestError(f"{self.url}{path}: unexpected answer ({exc})") from None

    def _send(
        self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: object
    ) -> httpx.Response:
        """One request answered with a status in `ok`. A timeout propagates (as
        httpx.TimeoutException) to the caller that knows how to learn the outcome; no
        connection is a ServerUnreachableError, every other failure an AdminRequestError
        with the status and the error body's type."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"{self.url}: cannot reach the server ({exc})") from None
        except httpx.HTTPError as exc:
            raise AdminRequestError(f"{self.url}: request failed ({exc})") from None
        if response.status_code not in ok:
            raise AdminRequestError(
                f"server refused ({response.status_code}): {_message(response)}",
                status=response.status_code,
                kind=_kind(response),
            )
        return response


def read_delta_bytes(delta_file: Path) -> bytes:
    try:
        return Path(delta_file).read_bytes()
    except OSError as exc:
        raise AdminRequestError(f"{delta_file}: cannot read delta file ({exc})") from None


@dataclass
class ReplicaOutcome:
    """What one replica of a fleet did with an update, and which model it serves after."""

    url: str
    result: ApplyResponse | None = None  # set when the replica answered the update
    error: str | None = None  # set when it refused or could not be reached
    rolled_back_to: str | None = None  # fingerprint it was returned to after a failure
    rollback_error: str | None = None  # set when that return failed
    fingerprint: str | None = None  # what it serves at the end (asked after the rollout)
    version: int | None = None


def update_fleet(
    urls: Sequence[str], token: str | None, delta_file: Path, *, rollback_on_failure: bool = True
) -> list[ReplicaOutcome]:
    """Apply one delta to several replicas behind a load balancer, one after another.

    A replica that fails stops the rollout. With `rollback_on_failure` (the default) the
    replicas this rollout changed are rolled back to the model they served before (by
    fingerprint). Finally every reachable replica is asked what it serves, so a mix of
    models is always visible in the outcomes, never silent.
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
    if any(o.error for o in outcomes) and rollback_on_failure:
        for outcome in outcomes:
            if outcome.result is None or not outcome.result.applied:
                continue
            previous = outcome.result.previous_fingerprint
            try:
                with AdminClient(outcome.url, token) as client:
                    client.rollback(to_fingerprint=previous, if_match=outcome.result.fingerprint)
                outcome.rolled_back_to = previous
            except AdminRequestError as exc:
                outcome.rollback_error = str(exc)
    for outcome in outcomes:
        try:
            with AdminClient(outcome.url, token) as client:
                status = client.status()
            outcome.fingerprint, outcome.version = status.fingerprint, status.version
        except (AdminRequestError, httpx.TimeoutException):
            continue
    return outcomes


def _kind(response: httpx.Response) -> str | None:
    try:
        return ErrorBody.model_validate_json(response.content).error.type
    except ValidationError:
        return None


def _message(response: httpx.Response) -> str:
    """The server's error message, whichever JSON error shape (jlserve's or vLLM's) it used."""
    try:
        return ErrorBody.model_validate_json(response.content).error.message
    except ValidationError:
        return response.text.strip()[:500] or response.reason_phrase
