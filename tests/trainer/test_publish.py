"""The trainer feeding a live server: --publish URL, --publish-dir DIR, --eval-via URL.

Two real `jlserve serve` processes on the tiny model (fp32 compute, like the trainer's
CPU evaluation); the trainer runs in process through its CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jlserve.cli import main as jlserve_main
from jlserve.delta import diff_tensors
from tests.helpers.serving import ADMIN_TOKEN, ServerProcess, admin_status, start_all
from trainer.cli import main as trainer_main
from trainer.config import load_config
from trainer.data import Encoder, generate_greedy, greedy_tokens, load_stream, score
from trainer.errors import TrainerError
from trainer.publish import ServerPublisher
from trainer.served import ServedModel

pytestmark = pytest.mark.slow
FP32_ENGINE = ("--dtype", "float32")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, cl_data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    token = root / "admin.token"
    token.write_text(ADMIN_TOKEN)
    watch = root / "incoming"
    watch.mkdir()
    by_url = ServerProcess(
        tiny_model_dir, root / "s1", root / "s1.log", ("--admin-token-file", str(token)),
        engine_args=FP32_ENGINE,
    )  # fmt: skip
    by_dir = ServerProcess(
        tiny_model_dir, root / "s2", root / "s2.log", ("--insecure-admin", "--watch", str(watch)),
        engine_args=FP32_ENGINE,
    )  # fmt: skip
    start_all([by_url, by_dir])
    cfg = root / "cfg.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{root: {cl_data_root}, tasks: [movie_sentiment, tweet_sentiment], train_rows: 16,"
        " eval_rows: 8,"
        " max_length: 96}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
    )
    reference = root / "reference"
    assert trainer_main(["--config", str(cfg), "--out", str(reference)]) == 0
    yield {
        "url": by_url,
        "dir": by_dir,
        "watch": watch,
        "token": token,
        "cfg": cfg,
        "ref": reference,
    }
    by_url.stop()
    by_dir.stop()


def accuracy(run: Path) -> dict:
    acc = json.loads((run / "metrics.json").read_text())["accuracy"]
    return {"exact": acc["matrix"], "prefix": acc["prefix_matrix"]}


def final_fingerprint(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["versions"][-1]["fingerprint"]


def test_publish_and_eval_via_the_server_match_in_process(setup, tmp_path, capsys):
    server, run, cache = setup["url"], tmp_path / "run", tmp_path / "cache"
    code = trainer_main(
        ["--config", str(setup["cfg"]), "--out", str(run), "--publish", server.url,
         "--admin-token-file", str(setup["token"]), "--eval-via", server.url,
         "--eval-cache", str(cache)]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert (
        "published movie_sentiment" in err
        and "published tweet_sentiment" in err
        and "as version 2" in err
    )
    assert admin_status(server)["version"] == 2
    assert (
        admin_status(server)["fingerprint"]
        == final_fingerprint(run)
        == final_fingerprint(setup["ref"])
    )
    assert accuracy(run) == accuracy(setup["ref"])
    # what the server answered is kept apart from what generation in process gives
    assert len(list(cache.glob("*.json"))) == 6  # base row, then 2 tasks x 2 rows
    local = tmp_path / "local"
    args = ["--config", str(setup["cfg"]), "--out", str(local), "--eval-cache", str(cache)]
    assert trainer_main(args) == 0
    assert len(list(cache.glob("*.json"))) == 12
    assert accuracy(local) == accuracy(setup["ref"])


def test_served_predictions_equal_in_process_predictions(setup):
    """Stronger than equal accuracy: the same text for every prompt of the last version."""
    server, ref = setup["url"], setup["ref"]
    cfg = load_config(setup["cfg"])
    merged = next((ref / "merged").iterdir())
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    enc = Encoder(AutoTokenizer.from_pretrained(merged), cfg.data.max_length)
    served = ServedModel(server.url)
    try:
        for task in load_stream(cfg.data, cfg.train.seed):
            prompts, n = enc.eval_prompts(task), enc.max_target_len(task)
            local = generate_greedy(model, enc, prompts, n, 8, torch.device("cpu"))
            remote = served.generate(
                prompts, max_new_tokens=n, stop_token=enc.eos, fingerprint=final_fingerprint(ref)
            )
            assert remote == local
    finally:
        served.close()


def test_served_chat_equals_in_process_chat(setup):
    """data.prompt_format chat: a user message through /v1/chat/completions (the official
    client) is answered from the same prompt ids and with the same tokens as greedy
    generation in process, so both score the same; `predict` checks the prompt ids on
    every request."""
    server, ref = setup["url"], setup["ref"]
    cfg = load_config(setup["cfg"], ["data.prompt_format=chat", "data.max_length=192"])
    merged = next((ref / "merged").iterdir())
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    enc = Encoder(AutoTokenizer.from_pretrained(merged), cfg.data.max_length, "chat")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    served = ServedModel(server.url)
    try:
        for task in load_stream(cfg.data, cfg.train.seed):
            n, chats = enc.max_target_len(task), enc.eval_chats(task)
            prompts = [ids for _, ids in chats]
            local = greedy_tokens(model, enc, prompts, n, 8, torch.device("cpu"))
            for (messages, ids), expected in zip(chats, local, strict=True):
                reply = client.chat.completions.create(
                    model=client.models.list().data[0].id,
                    messages=messages,
                    max_tokens=n, temperature=0,
                    extra_body={"stop_token_ids": [enc.stop], "return_token_ids": True},
                )  # fmt: skip
                assert reply.prompt_token_ids == ids
                assert reply.choices[0].token_ids == expected
            texts = [enc.tok.decode(t, skip_special_tokens=True) for t in local]
            served_texts = served.predict(enc, task, fingerprint=final_fingerprint(ref))
            assert score(task, served_texts) == score(task, texts)
        messages, ids = chats[0]
        with pytest.raises(TrainerError, match="chat prompt differs from the trainer's"):
            served.chat(
                [(messages, ids[1:])], max_new_tokens=n, stop_token=enc.stop,
                fingerprint=final_fingerprint(ref),
            )  # fmt: skip
    finally:
        served.close()


def test_publish_dir_feeds_a_watching_server(setup, tmp_path):
    server, run = setup["dir"], tmp_path / "run"
    code = trainer_main(
        ["--config", str(setup["cfg"]), "--out", str(run), "--publish-dir", str(setup["watch"]),
         "--eval-via", server.url]
    )  # fmt: skip
    assert code == 0
    assert admin_status(server)["fingerprint"] == final_fingerprint(run)
    assert accuracy(run) == accuracy(setup["ref"])
    # readable by a server that runs as another user (a container's)
    assert {p.stat().st_mode & 0o777 for p in setup["watch"].glob("*.safetensors")} == {0o644}


def test_republishing_an_applied_delta_is_skipped(setup, tmp_path, capsys):
    """A resumed run re-publishes what a crash left unrecorded: the server already has it.
    The watched folder does not re-apply its files after the rollback (its bookkeeping)."""
    server = setup["dir"]
    first = admin_status(server)["chain"][0]
    assert jlserve_main(["rollback", "--to", first["fingerprint"], "--url", server.url]) == 0
    run = tmp_path / "run"
    assert (
        trainer_main(["--config", str(setup["cfg"]), "--out", str(run), "--publish", server.url])
        == 0
    )
    err = capsys.readouterr().err
    assert "movie_sentiment already served" in err and "published tweet_sentiment" in err
    assert admin_status(server)["fingerprint"] == final_fingerprint(run)
    assert admin_status(server)["version"] == 3  # a new number: 2 named it before the rollback


def test_a_refusal_stops_the_run_with_the_servers_message(setup, tmp_path, capsys):
    server = setup["url"]  # now at version 2: a fresh run's v1 does not fit
    code = trainer_main(
        ["--config", str(setup["cfg"]), "--out", str(tmp_path / "run"), "--publish", server.url,
         "--admin-token-file", str(setup["token"])]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "refused (409)" in err and "Traceback" not in err
    assert admin_status(server)["version"] == 2


def test_unreachable_server_is_retried_then_reported():
    base = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    delta = diff_tensors(base, {"w": torch.ones(4, dtype=torch.bfloat16)}, task="x", version=1)
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens there
    publisher = ServerPublisher(dead, None, attempts=3, first_backoff_s=0.01)
    with pytest.raises(TrainerError, match="gave up after 3 attempts"):
        publisher.publish(delta, delta.to_bytes(), "task001-x.safetensors")


def test_an_appended_task_is_evaluated_through_the_server_serving_its_run(
    setup, cl_data_root, tmp_path, monkeypatch
):
    """--add-task with --publish and --eval-via: the server serves the run's last version,
    so the new task's entry on it before training (FWT) is asked of the server too; the
    matrix equals the same append evaluated in process."""
    server, ref = setup["url"], setup["ref"]
    auth = ["--admin-token-file", str(setup["token"])]
    if admin_status(server)["fingerprint"] != final_fingerprint(ref):  # run alone: catch up
        for delta in sorted((ref / "deltas").iterdir()):
            assert jlserve_main(["update", "--delta", str(delta), "--url", server.url, *auth]) == 0
    asked: list[tuple[str, str]] = []
    predict = ServedModel.predict

    def recorded(self, enc, task, *, fingerprint):
        asked.append((task.name, fingerprint))
        return predict(self, enc, task, fingerprint=fingerprint)

    monkeypatch.setattr(ServedModel, "predict", recorded)
    third = ["--add-task", f"bbc_topic={cl_data_root / 'bbc_topic'}"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    shutil.copytree(ref, local)
    shutil.copytree(ref, remote)
    assert trainer_main(["--out", str(local), *third]) == 0
    assert asked == []
    via = ["--publish", server.url, *auth, "--eval-via", server.url]
    assert trainer_main(["--out", str(remote), *third, *via]) == 0
    assert ("bbc_topic", final_fingerprint(ref)) in asked  # the entry before it trains
    assert (
        admin_status(server)["fingerprint"] == final_fingerprint(remote) == final_fingerprint(local)
    )
    assert accuracy(remote) == accuracy(local)
