"""Fine-tuning jobs on the default model: two chat tasks sent with the official `openai` SDK
to a `jlserve serve` of SmolLM2-135M, trained by a `jlserve worker`, served under the same
model name; every task's held-out score through the server equals the worker's own."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from tests.helpers.jobs import Worker, job_in, upload
from tests.helpers.serving import ADMIN_TOKEN, ServerProcess, admin_status
from tests.helpers.taskfiles import chat_sentiment, cl_rows, smallest_job_files, write_jsonl
from trainer.append import appended_tasks
from trainer.config import RunConfig
from trainer.data import Encoder, score
from trainer.served import ServedModel

pytestmark = pytest.mark.slow


def chat_topic(root: Path, out: Path) -> Path:
    """BBC articles -> their topic, as chat lines: a second classification task."""
    return write_jsonl(out, [
        {"messages": [
            {"role": "system", "content": "Name the topic of the article in one word."},
            {"role": "user", "content": r["sentence"][:300]},
            {"role": "assistant", "content": r["label"]},
        ]}
        for r in cl_rows(root, "bbc_topic")
    ])  # fmt: skip


def test_two_chat_jobs_are_served_under_the_same_name_and_score_as_the_worker_said(
    smollm2_dir, cl_data_root, tmp_path
):
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN)
    server = ServerProcess(
        smollm2_dir,
        tmp_path / "state",
        tmp_path / "server.log",
        ("--admin-token-file", str(token)),
        engine_args=("--dtype", "float32"),  # the worker evaluates in float32 on CPU
    )
    (tmp_path / "cfg.yaml").write_text(
        f"model: {smollm2_dir}\n"
        "data: {max_length: 256, prompt_format: chat}\n"
        "train: {batch_size: 8, eval_batch_size: 8, epochs: 1}\n"
    )
    server.start().wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_TOKEN, max_retries=0)
        jobs = []
        for seed, (name, make) in enumerate(
            (("sentiment", chat_sentiment), ("topic", chat_topic)), 11
        ):
            train, valid = smallest_job_files(make(cl_data_root, tmp_path / f"{name}.jsonl"))
            jobs.append(
                client.fine_tuning.jobs.create(
                    model=server.model_name,
                    training_file=upload(client, train).id,
                    validation_file=upload(client, valid).id,
                    suffix=name,
                    seed=seed,
                )
            )
        worker = Worker(server, tmp_path, "--max-jobs", "2")
        done = [job_in(client, j.id, "succeeded", "failed", timeout=900) for j in jobs]
        assert [d.status for d in done] == ["succeeded"] * 2, [d.error for d in done]
        assert worker.wait() == 0
        assert [d.version for d in done] == [1, 2]
        assert {d.fine_tuned_model for d in done} == {server.model_name}
        info = json.loads((tmp_path / "run" / "run.json").read_text())
        # the first job's seed is the run's, the second's that task's own
        assert info["config"]["train"]["seed"] == 11
        assert [a["settings"] for a in info["appended"]] == [{}, {"train.seed": 12}]
        assert admin_status(server)["fingerprint"] == info["versions"][-1]["fingerprint"]
        # every task's held-out rows asked through the server, scored as the worker scores
        cfg = RunConfig.model_validate(info["config"])
        enc = Encoder(AutoTokenizer.from_pretrained(smollm2_dir), cfg.data.max_length, "chat")
        matrix = json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy"]["matrix"]
        model = ServedModel(server.url)
        try:
            tasks = appended_tasks(tmp_path / "run", cfg, info["appended"])
            for j, task in enumerate(tasks):
                texts = model.predict(enc, task, fingerprint=done[-1].fingerprint)
                assert score(task, texts).exact == matrix[-1][j], task.name
        finally:
            model.close()
        reply = client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": "an awful, boring film"}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.model == server.model_name and reply.choices[0].message.content
    finally:
        server.stop()
