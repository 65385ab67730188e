"""The jobs worker's client of the server: claim, renew, report, publish, finish.

Light (httpx and pydantic only), so `jlserve worker` can run anywhere it reaches the
server over HTTP. Refusals raise `AdminRequestError` with the status and error type
(`lease_lost`: the job is no longer this worker's); an unreachable server raises
`ServerUnreachableError`, which the worker retries.
"""

from __future__ import annotations

from pathlib import Path

from jlserve.client import AdminClient
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

SHORT_S = 10.0  # lease renewals and events: small, and late ones are retried


class WorkerClient(AdminClient):
    def claim(self, worker: str) -> ClaimResponse | None:
        """The next job under a lease, or None when no job can run now."""
        body = ClaimRequest(worker=worker).model_dump()
        response = self._send("POST", "/admin/jobs/claim", ok=(200, 204), json=body)
        if response.status_code == 204:
            return None
        return ClaimResponse.model_validate_json(response.content)

    def renew(self, job_id: str, lease_id: str) -> LeaseStatus:
        body = LeaseRenewal(lease_id=lease_id).model_dump()
        return self._call(
            "POST", f"/admin/jobs/{job_id}/lease", LeaseStatus, json=body, timeout=SHORT_S
        )

    def events(self, job_id: str, lease_id: str, events: list[WorkerEvent]) -> None:
        body = EventBatch(lease_id=lease_id, events=events).model_dump()
        self._send("POST", f"/admin/jobs/{job_id}/events", json=body, timeout=SHORT_S)

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
        response = self._send(
            "GET", f"/admin/jobs/{job_id}/files/{which}", headers={LEASE_HEADER: lease_id}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path
