"""The jobs worker's client of the server: claim, renew, report, publish, finish.

Light (httpx and pydantic only), so `jlserve worker` can run anywhere it reaches the
server over HTTP. Refusals raise `AdminRequestError` with the status and error type
(`lease_lost`: the job is no longer this worker's); an unreachable server raises
`ServerUnreachableError`, which the worker retries.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from jlserve.client import AdminClient
from jlserve.errors import AdminRequestError, ServerUnreachableError
from jlserve.jobs.schemas import (
    LEASE_HEADER,
    ClaimRequest,
    ClaimResponse,
    EventBatch,
    FineTuningJob,
    FinishRequest,
    LeaseRenewal,
    LeaseStatus,
    WorkerEvent,
)


class WorkerClient(AdminClient):
    def claim(self, worker: str) -> ClaimResponse | None:
        """The next job under a lease, or None when no job can run now."""
        body = ClaimRequest(worker=worker).model_dump()
        try:
            response = self._http.post("/admin/jobs/claim", json=body)
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(f"{self.url}: cannot reach the server ({exc})") from None
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise AdminRequestError(
                f"claim refused ({response.status_code}): {response.text[:500]}",
                status=response.status_code,
            )
        return ClaimResponse.model_validate_json(response.content)

    def renew(self, job_id: str, lease_id: str) -> LeaseStatus:
        body = LeaseRenewal(lease_id=lease_id).model_dump()
        return self._call("POST", f"/admin/jobs/{job_id}/lease", LeaseStatus, json=body)

    def events(self, job_id: str, lease_id: str, events: list[WorkerEvent]) -> None:
        body = EventBatch(lease_id=lease_id, events=events).model_dump()
        self._http_ok("POST", f"/admin/jobs/{job_id}/events", json=body)

    def publish(self, job_id: str, lease_id: str, data: bytes) -> FineTuningJob:
        return self._call(
            "POST",
            f"/admin/jobs/{job_id}/publish",
            FineTuningJob,
            content=data,
            headers={LEASE_HEADER: lease_id},
        )

    def finish(self, job_id: str, request: FinishRequest) -> FineTuningJob:
        body = request.model_dump(mode="json")
        return self._call("POST", f"/admin/jobs/{job_id}/finish", FineTuningJob, json=body)

    def download(self, job_id: str, lease_id: str, which: str, path: Path) -> Path:
        """The job's `training_file` or `validation_file`, written to `path`."""
        try:
            response = self._http.get(
                f"/admin/jobs/{job_id}/files/{which}", headers={LEASE_HEADER: lease_id}
            )
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(f"{self.url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise AdminRequestError(
                f"{which} of {job_id}: download refused ({response.status_code}): "
                f"{response.text[:500]}",
                status=response.status_code,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path

    def _http_ok(self, method: str, path: str, **kwargs: object) -> None:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(f"{self.url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise AdminRequestError(
                f"{path} refused ({response.status_code}): {response.text[:500]}",
                status=response.status_code,
            )
