"""The jobs' store (jlserve/jobs/store.py): files by content hash, jobs as compare-and-set
records, one running job under a lease, events newest first, all kept across a reopen."""

from __future__ import annotations

import io
import time

import pytest

from jlserve.jobs.schemas import FineTuningJob, Hyperparameters, JobStatus
from jlserve.jobs.store import (
    ConflictError,
    JobStore,
    LeaseLostError,
    NotFoundError,
    TooLargeError,
    new_id,
    now,
)

PARENT = "sha256:" + "0" * 64


def a_job(store: JobStore, file_id: str, status: JobStatus = JobStatus.QUEUED) -> FineTuningJob:
    job = FineTuningJob(
        id=new_id("ftjob"),
        created_at=now(),
        hyperparameters=Hyperparameters(),
        model="m",
        seed=1,
        status=status,
        training_file=file_id,
        method={"type": "supervised"},
        task="t",
    )
    store.add_job(job)
    return job


def test_files_are_stored_once_by_content_and_survive_a_reopen(tmp_path):
    store = JobStore(tmp_path)
    one = store.put_file(io.BytesIO(b"abc\n"), "../../etc/passwd", "fine-tune", limit=10)
    two = store.put_file(io.BytesIO(b"abc\n"), "b.jsonl", "fine-tune", limit=10)
    assert one.id != two.id and one.sha256 == two.sha256 and one.bytes == 4
    assert [p.name for p in store.blobs.iterdir()] == [one.sha256]  # the name is never a path
    assert one.filename == "../../etc/passwd"
    store.close()
    store = JobStore(tmp_path)
    assert store.file(one.id) == one and store.file_path(two.id).read_bytes() == b"abc\n"
    store.delete_file(one.id)
    assert store.file_path(two.id).is_file()  # still named by the other record
    store.delete_file(two.id)
    assert list(store.blobs.iterdir()) == []
    with pytest.raises(NotFoundError, match="no file"):
        store.file(one.id)


def test_an_upload_over_the_limit_leaves_nothing(tmp_path):
    store = JobStore(tmp_path)
    with pytest.raises(TooLargeError, match="limit of 10 bytes"):
        store.put_file(io.BytesIO(b"x" * 11), "big", "fine-tune", limit=10)
    assert list(store.blobs.iterdir()) == []
    assert store.files(purpose=None, after=None, limit=10, newest_first=True) == ([], False)


def test_bytes_no_row_names_are_removed_at_open(tmp_path):
    store = JobStore(tmp_path)
    kept = store.put_bytes(b"kept", "k", "fine-tune")
    (store.blobs / ("f" * 64)).write_bytes(b"a crash between the bytes and their row")
    (store.blobs / ".upload-1.tmp").write_bytes(b"half an upload")
    store.close()
    store = JobStore(tmp_path)
    assert [p.name for p in store.blobs.iterdir()] == [kept.sha256]


def test_file_pages_follow_the_cursor_and_filter_by_purpose(tmp_path):
    store = JobStore(tmp_path)
    made = [store.put_bytes(bytes([i]), f"f{i}", "fine-tune") for i in range(5)]
    store.put_bytes(b"result", "r", "fine-tune-results")
    page, more = store.files(purpose="fine-tune", after=None, limit=2, newest_first=True)
    assert [f.id for f in page] == [made[4].id, made[3].id] and more
    page, more = store.files(purpose="fine-tune", after=made[3].id, limit=10, newest_first=True)
    assert [f.id for f in page] == [m.id for m in made[2::-1]] and not more
    page, _ = store.files(purpose=None, after=None, limit=2, newest_first=False)
    assert [f.id for f in page] == [made[0].id, made[1].id]
    with pytest.raises(NotFoundError, match="after="):
        store.files(purpose=None, after="file-nope", limit=2, newest_first=True)


def test_a_file_an_unfinished_job_needs_cannot_be_deleted(tmp_path):
    store = JobStore(tmp_path)
    f = store.put_bytes(b"rows", "t.jsonl", "fine-tune")
    job = a_job(store, f.id)
    with pytest.raises(ConflictError, match=f"used by {job.id}"):
        store.delete_file(f.id)
    store.update_job(job.id, expect=(JobStatus.QUEUED,), status=JobStatus.CANCELLED)
    store.delete_file(f.id)


def test_jobs_run_one_at_a_time_in_order_under_a_lease(tmp_path):
    store = JobStore(tmp_path)
    f = store.put_bytes(b"rows", "t.jsonl", "fine-tune")
    first, second = a_job(store, f.id), a_job(store, f.id)
    a_job(store, f.id, status=JobStatus.VALIDATING_FILES)  # not yet claimable
    job, lease = store.claim_next(30.0, 0, PARENT)
    assert job.id == first.id and job.status is JobStatus.RUNNING
    assert job.parent_fingerprint == PARENT
    assert store.claim_next(30.0, 0, PARENT) is None  # the first still runs
    renewed, cancel = store.renew(job.id, lease.id, 30.0)
    assert renewed.expires_at >= lease.expires_at and not cancel
    with pytest.raises(LeaseLostError, match="another lease"):
        store.renew(job.id, "lease-other", 30.0)
    store.update_job(job.id, expect=(JobStatus.RUNNING,), cancel_requested=True)
    assert store.renew(job.id, lease.id, 30.0)[1] is True
    done = store.update_job(
        job.id, expect=(JobStatus.RUNNING,), lease_id=lease.id, status=JobStatus.CANCELLED
    )
    assert done.finished_at is not None
    with pytest.raises(LeaseLostError, match="cancelled"):
        store.renew(job.id, lease.id, 30.0)
    with pytest.raises(ConflictError, match="is cancelled"):  # compare-and-set
        store.update_job(job.id, expect=(JobStatus.RUNNING,), status=JobStatus.SUCCEEDED)
    assert store.claim_next(30.0, 0, PARENT)[0].id == second.id


def test_a_lapsed_lease_is_found_and_a_reopen_gives_running_jobs_a_full_one(tmp_path):
    store = JobStore(tmp_path)
    f = store.put_bytes(b"rows", "t.jsonl", "fine-tune")
    job = a_job(store, f.id)
    _, lease = store.claim_next(0.05, 0, PARENT)
    time.sleep(0.1)
    assert [j.id for j in store.expired()] == [job.id]
    store.extend_leases(30.0)  # the lease is still this worker's
    store.set_publishing(job.id, lease.id, "sha256:" + "1" * 64)
    store._db.execute("UPDATE jobs SET lease_expires = 0")  # lapse it again
    assert store.expired() == []  # a publish under way ends the job itself
    store.close()
    store = JobStore(tmp_path)  # a restart: the job, its lease and the publish are all there
    assert store.publishing() == {job.id: "sha256:" + "1" * 64}
    store.extend_leases(30.0)
    assert store.expired() == []
    store.renew(job.id, lease.id, 30.0)
    store.clear_publishing(job.id)
    assert store.publishing() == {}
    assert store.counts()["running"] == 1


def test_events_are_listed_newest_first_in_pages(tmp_path):
    store = JobStore(tmp_path)
    f = store.put_bytes(b"rows", "t.jsonl", "fine-tune")
    job, other = a_job(store, f.id), a_job(store, f.id)
    made = store.add_events(
        job.id, [(f"step {i}", {"step": i}, "info", "metrics") for i in range(5)]
    )
    store.add_event(other.id, "elsewhere", None)
    page, more = store.events(job.id, after=None, limit=3)
    assert [e.message for e in page] == ["step 4", "step 3", "step 2"] and more
    page, more = store.events(job.id, after=page[-1].id, limit=3)
    assert [e.id for e in page] == [made[1].id, made[0].id] and not more
    assert page[0].data == {"step": 1} and page[0].type == "metrics"
    with pytest.raises(NotFoundError):
        store.events("ftjob-nope", after=None, limit=3)
