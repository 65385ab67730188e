"""Fine-tuning jobs end to end: a real `jlserve serve` on the tiny model, the official
`openai` SDK as the client, and real `jlserve worker` processes training the jobs as tasks
of a continual run, each published into the same served model by hot-swap.

One server for the module; the tests run in file order and each leaves it consistent
(the run's last version is the served one). Every refusal and fault leaves the served
version unchanged.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jlserve.delta import read_delta
from tests.helpers.jobs import Worker, first_metrics, job_in, upload
from tests.helpers.serving import ADMIN_TOKEN, ServerProcess, admin_headers, admin_status
from tests.helpers.taskfiles import chat_sentiment, completion, good_file, with_bad_line, with_turn

pytestmark = pytest.mark.slow

LEASE_S = 10.0
MAX_FILE_BYTES = 400_000


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("jobs")
    token = root / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    flags = ("--admin-token-file", str(token), "--job-lease", str(LEASE_S))
    flags += ("--max-file-bytes", str(MAX_FILE_BYTES))
    proc = ServerProcess(tiny_model_dir, root / "state", root / "server.log", flags)
    proc.start().wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def task_files(cl_data_root, tmp_path_factory) -> tuple[Path, Path]:
    """(training file, validation file): the pip-built task has too few rows to hold
    out a share, so its last 20 examples are the validation file."""
    root = tmp_path_factory.mktemp("files")
    lines = chat_sentiment(cl_data_root, root / "all.jsonl").read_text().splitlines()
    train, valid = root / "sentiment.jsonl", root / "sentiment-valid.jsonl"
    train.write_text("\n".join(lines[:-20]) + "\n")
    valid.write_text("\n".join(lines[-20:]) + "\n")
    return train, valid


@pytest.fixture(scope="module")
def task_file(task_files) -> Path:
    return task_files[0]


@pytest.fixture(scope="module")
def files(client, task_files) -> dict[str, str | int]:
    """The uploaded pair and a seed, as job arguments. The seed keeps the tests repeatable:
    a job without one draws one, and on some the tiny model's gate closes on every entry
    (an empty delta: the served version stays)."""
    train, valid = (upload(client, path).id for path in task_files)
    return {"training_file": train, "validation_file": valid, "seed": 42}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("worker")
    (root / "cfg.yaml").write_text(
        f"model: {tiny_model_dir}\n"
        "data: {train_rows: 16, eval_rows: 8, max_length: 256}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
    )
    return root


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run" / "run.json").read_text())


# ---------------------------------------------------------------- files and refusals


def test_files_upload_list_read_and_delete(client, task_file, server):
    made = upload(client, task_file)
    assert made.bytes == task_file.stat().st_size and made.filename == "sentiment.jsonl"
    assert client.files.retrieve(made.id).id == made.id
    assert made.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.content(made.id).read() == task_file.read_bytes()
    assert client.files.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="assistants")
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="fine-tune")
    assert caught.value.status_code == 413
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-token-0123456789")
    with pytest.raises(openai.PermissionDeniedError):
        stranger.files.list()
    r = httpx.get(f"{server.url}/v1/fine_tuning/jobs")  # no token at all
    assert r.status_code == 401 and r.json()["error"]["message"]
    assert admin_status(server)["version"] == 0


def test_job_requests_that_cannot_run_are_refused_with_the_field_named(client, task_file, server):
    f = upload(client, task_file)
    name = server.model_name
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    assert caught.value.body["param"] == "model" and name in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model=name, training_file=f.id, method={"type": "dpo", "dpo": {}}
        )
    assert caught.value.body["param"] == "method.type"
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.create(model=name, training_file="file-nope")
    assert caught.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model=name, training_file=f.id, hyperparameters={"n_epochs": 0}
        )
    assert "n_epochs" in caught.value.message
    assert admin_status(server)["version"] == 0


def test_a_malformed_file_fails_its_job_naming_the_line(client, tmp_path, server):
    bad = with_bad_line(tmp_path / "bad.jsonl", with_turn(2, role="bot"))
    job = client.fine_tuning.jobs.create(
        model=server.model_name, training_file=upload(client, bad).id
    )
    assert job.status == "validating_files"
    failed = job_in(client, job.id, "failed", "queued")
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert "line 7: message 2: unknown role 'bot'" in failed.error.message
    assert failed.error.param == "training_file"
    # what the worker would refuse later is refused now: too few rows to hold a share out,
    small = upload(client, good_file(tmp_path / "small.jsonl", n=12))
    job = client.fine_tuning.jobs.create(model=server.model_name, training_file=small.id)
    failed = job_in(client, job.id, "failed", "queued")
    assert (
        failed.error.code == "invalid_training_file" and "validation file" in failed.error.message
    )
    # and a validation file in the other format
    other = upload(client, good_file(tmp_path / "c.jsonl", make=completion, n=12))
    job = client.fine_tuning.jobs.create(
        model=server.model_name, training_file=small.id, validation_file=other.id
    )
    failed = job_in(client, job.id, "failed", "queued")
    assert (
        failed.error.code == "invalid_validation_file" and failed.error.param == "validation_file"
    )
    assert "completion format, but the training file is in chat format" in failed.error.message
    assert admin_status(server)["version"] == 0


def test_a_queued_job_is_cancelled_at_once(client, files, server):
    job = client.fine_tuning.jobs.create(model=server.model_name, **files)
    job_in(client, job.id, "queued")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)


# ---------------------------------------------------------------- jobs trained and served


def test_jobs_train_in_order_and_the_same_model_serves_each(
    client, files, server, run_dir, tmp_path
):
    first = client.fine_tuning.jobs.create(
        model=server.model_name,
        **files,
        suffix="sentiment",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    second = client.fine_tuning.jobs.create(
        model=server.model_name, **files, suffix="sentiment-again"
    )
    worker = Worker(server, run_dir, "--max-jobs", "2")
    job_in(client, first.id, "running")
    assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"  # behind the first
    done = job_in(client, first.id, "succeeded", "failed")
    assert done.status == "succeeded", (done.error, worker.log.read_text()[-3000:])
    assert done.fine_tuned_model == server.model_name and done.version == 1
    assert done.hyperparameters.n_epochs == 2 and done.trained_tokens > 0
    done2 = job_in(client, second.id, "succeeded", "failed")
    assert done2.status == "succeeded", (done2.error, worker.log.read_text()[-3000:])
    assert worker.wait() == 0
    status = admin_status(server)
    info = run_info(run_dir)
    # the served model is exactly the run's last version, numbered as the jobs say
    assert status["version"] == done2.version == 2
    assert status["fingerprint"] == info["versions"][-1]["fingerprint"] == done2.fingerprint
    assert info["tasks"] == ["sentiment", "sentiment-again"]
    # events: validation, per-step metrics, publish and the end, newest first
    events = list(client.fine_tuning.jobs.list_events(first.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0].startswith("The job has successfully completed")
    assert any(m.startswith("Published: ") for m in messages)
    assert any(e.type == "metrics" and e.data["train_loss"] > 0 for e in events)
    assert "Files validated, job queued" in messages
    # the checkpoint is the served version; its delta file is the run's delta
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(first.id).data
    assert checkpoint.fine_tuned_model_checkpoint == f"{server.model_name}@1"
    assert checkpoint.metrics.train_loss > 0 and checkpoint.step_number > 0
    delta_id, metrics_id = done.result_files
    saved = tmp_path / "delta.safetensors"
    saved.write_bytes(client.files.content(delta_id).read())
    run_delta = run_dir / "run" / "deltas" / info["versions"][1]["delta"]
    assert read_delta(saved).metadata == read_delta(run_delta).metadata
    assert json.loads(client.files.content(metrics_id).read())["tasks"][0]["task"] == "sentiment"
    # inference on the same name, no task id
    chat = client.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "a wonderful film"}],
        max_tokens=4,
        temperature=0,
    )
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.ConflictError) as caught:  # a task name is used once
        client.fine_tuning.jobs.create(model=server.model_name, **files, suffix="sentiment")
    assert caught.value.body["param"] == "suffix"
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    assert listed.index(second.id) < listed.index(first.id)  # newest first


def test_cancel_reaches_a_running_worker_and_the_run_is_left_as_it_was(
    client, files, server, run_dir
):
    before, tasks = admin_status(server), run_info(run_dir)["tasks"]
    job = client.fine_tuning.jobs.create(
        model=server.model_name,
        **files,
        hyperparameters={"n_epochs": 50},
    )
    worker = Worker(server, run_dir, "--max-jobs", "1")
    first_metrics(client, job.id)
    assert client.fine_tuning.jobs.cancel(job.id).cancel_requested
    ended = job_in(client, job.id, "cancelled", "failed", "succeeded", timeout=60)
    assert ended.status == "cancelled"
    assert worker.wait() == 0
    assert admin_status(server)["fingerprint"] == before["fingerprint"]
    assert run_info(run_dir)["tasks"] == tasks  # taken back out of the run


def test_a_killed_worker_loses_its_job_and_the_next_one_goes_on(client, files, server, run_dir):
    before, tasks = admin_status(server), run_info(run_dir)["tasks"]
    job = client.fine_tuning.jobs.create(
        model=server.model_name,
        **files,
        hyperparameters={"n_epochs": 50},
    )
    worker = Worker(server, run_dir)
    first_metrics(client, job.id)
    worker.kill()
    lost = job_in(client, job.id, "failed", timeout=LEASE_S * 5)
    assert lost.error.code == "worker_lost" and "unchanged" in lost.error.message
    assert admin_status(server)["fingerprint"] == before["fingerprint"]
    assert run_info(run_dir)["tasks"] != tasks  # the dead worker left its task appended
    nxt = client.fine_tuning.jobs.create(model=server.model_name, **files, suffix="after")
    Worker(server, run_dir, "--max-jobs", "1").wait()
    assert job_in(client, nxt.id, "succeeded", "failed").status == "succeeded"
    assert run_info(run_dir)["tasks"] == [*tasks, "after"]  # the lost task was taken out


def test_a_model_changed_under_a_job_fails_it_and_the_worker_refuses_until_in_step(
    client, files, server, run_dir
):
    start = admin_status(server)
    job = client.fine_tuning.jobs.create(
        model=server.model_name,
        **files,
        hyperparameters={"n_epochs": 24},  # the rollback must come before its publish
    )
    worker = Worker(server, run_dir, "--max-jobs", "2")
    job_in(client, job.id, "running")
    r = httpx.post(  # someone rolls the served model back while the job trains
        f"{server.url}/admin/rollback",
        json={"to_version": start["version"] - 1},
        headers=admin_headers(),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    failed = job_in(client, job.id, "failed", "succeeded")
    assert failed.status == "failed" and failed.error.code == "parent_changed"
    rolled = admin_status(server)
    assert rolled["version"] == start["version"] - 1
    nxt = client.fine_tuning.jobs.create(model=server.model_name, **files)
    out_of_step = job_in(client, nxt.id, "failed", "succeeded")
    assert out_of_step.error.code == "model_out_of_sync"
    assert worker.wait() == 0
    assert admin_status(server)["fingerprint"] == rolled["fingerprint"]
    # docs/jobs.md: bring them together by serving the run's last version again (its delta)
    last = run_info(run_dir)["versions"][-1]
    r = httpx.post(
        f"{server.url}/admin/deltas",
        content=(run_dir / "run" / "deltas" / last["delta"]).read_bytes(),
        headers=admin_headers(),
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["fingerprint"] == start["fingerprint"], r.text
    again = client.fine_tuning.jobs.create(model=server.model_name, **files)
    Worker(server, run_dir, "--max-jobs", "1").wait()
    assert job_in(client, again.id, "succeeded", "failed").status == "succeeded"


def test_prometheus_metrics_count_the_jobs_as_the_api_lists_them(client, server):
    """/metrics after the jobs above: the gauge per status, the failures per error code and
    the durations of the claimed jobs agree with what the jobs API says of each job."""
    jobs = list(client.fine_tuning.jobs.list(limit=100))
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    }
    gauge = {s.labels["status"]: s.value for s in families["jlserve_jobs"].samples}
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert gauge.get(status, 0) == sum(j.status == status for j in jobs), status
    failed = Counter(j.error.code for j in jobs if j.status == "failed")
    assert {"worker_lost", "parent_changed", "model_out_of_sync"} <= failed.keys()
    counted = {
        s.labels["code"]: s.value
        for s in families["jlserve_jobs_failed"].samples
        if s.name == "jlserve_jobs_failed_total"
    }
    assert counted == failed
    durations = {
        s.labels["status"]: s.value
        for s in families["jlserve_job_duration_seconds"].samples
        if s.name == "jlserve_job_duration_seconds_count"
    }
    assert durations["succeeded"] == gauge["succeeded"]  # every one was claimed by a worker


def test_a_server_killed_mid_job_comes_back_and_the_job_finishes(client, files, server, run_dir):
    before = admin_status(server)
    job = client.fine_tuning.jobs.create(
        model=server.model_name,
        **files,
        hyperparameters={"n_epochs": 3},
    )
    worker = Worker(server, run_dir, "--max-jobs", "1")
    first_metrics(client, job.id)
    server.kill()
    server.start().wait_ready()
    done = job_in(client, job.id, "succeeded", "failed", "cancelled")
    assert done.status == "succeeded", (done.error, worker.log.read_text()[-3000:])
    assert worker.wait() == 0
    after = admin_status(server)
    assert after["version"] == before["version"] + 1 == done.version
    assert after["fingerprint"] == run_info(run_dir)["versions"][-1]["fingerprint"]
    assert os.path.isfile(server.log_path)
