"""A user's own tasks: chat and prompt/completion JSONL files appended to a run and
trained, scored by exact match or ROUGE-L (trainer/freeform.py), on the tiny model."""

from __future__ import annotations

import json

from tests.conftest import TWO_TASKS
from tests.helpers.taskfiles import chat_sentiment, completion_titles, write_jsonl
from trainer.cli import main as trainer_main
from trainer.data import Task, score
from trainer.freeform import choose_metric, rouge_l


def test_rouge_l_and_the_metric_choice_by_hand() -> None:
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["a b"], ["c d"]) == 0.0
    # LCS = all 5 predicted words of the 6 reference words: P = 1, R = 5/6, F1 = 10/11
    assert abs(rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) - 10 / 11) < 1e-9
    classes = [{"prompt": "x", "completion": c} for c in ["Yes", "No", "yes "] * 10]
    assert choose_metric(classes) == "exact"
    free = [{"prompt": "x", "completion": f"answer number {i}"} for i in range(30)]
    assert choose_metric(free) == "rougeL"
    task = Task("t", "", [], [], free[:2], format="completion", metric="rougeL")
    result = score(task, ["answer number 0", "something else"])
    assert result.exact == 0.5 * (1.0 + 0.0) and result.prefix == 0.5  # metric, exact match


def test_chat_and_completion_files_train_in_one_stream_with_their_own_metrics(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    chat = chat_sentiment(cl_data_root, tmp_path / "sentiment.jsonl")
    titles = completion_titles(cl_data_root, tmp_path / "titles.jsonl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{root: {cl_data_root}, tasks: [{TWO_TASKS[1]}], train_rows: 8, eval_rows: 4,"
        " max_length: 160}\n"
        "train: {batch_size: 8, eval_batch_size: 8}\n"
    )
    run = tmp_path / "run"
    assert trainer_main(["--config", str(cfg), "--out", str(run)]) == 0  # a benchmark task
    add = ["--add-task", f"sentiment={chat}", "--add-task", f"titles={titles}"]
    assert trainer_main(["--out", str(run), *add]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["tasks"] == [TWO_TASKS[1], "sentiment", "titles"] and info["completed"] == 3
    index = json.loads((run / "tasks" / "tasks.json").read_text())["tasks"]
    assert index["sentiment"] == {"format": "chat", "metric": "exact"}
    assert index["titles"] == {"format": "completion", "metric": "rougeL"}
    # A seeded 10 % held out, at least 20 rows, never trained on.
    train = json.loads((run / "tasks" / "titles" / "train.json").read_text())
    dev = json.loads((run / "tasks" / "titles" / "dev.json").read_text())
    assert len(dev) == 20 and len(train) == 96 - 20 and not {json.dumps(r) for r in dev} & {json.dumps(r) for r in train}  # fmt: skip
    acc = json.loads((run / "metrics.json").read_text())["accuracy"]
    assert all(v is not None for v in acc["matrix"][2]) and all(b is not None for b in acc["base"])
    # a chat file's examples are trained on their assistant turns only, via the template
    from transformers import AutoTokenizer

    from trainer.config import DataConfig
    from trainer.data import Encoder, load_stream

    enc = Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), 160)
    (task,) = load_stream(DataConfig(root=run / "tasks", tasks=["sentiment"]), seed=0)
    prompt, target = enc.train_examples(task)[0]
    assert enc.tok.decode(target) == task.train[0]["messages"][2]["content"] + "<|im_end|>"
    assert enc.tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert enc.stop_for(task) == enc.tok.convert_tokens_to_ids("<|im_end|>")


def test_a_bad_task_file_is_refused_by_line_and_the_run_is_unchanged(
    tmp_path, tiny_model_dir, cl_data_root, capsys
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{root: {cl_data_root}, tasks: [{TWO_TASKS[1]}], train_rows: 8, eval_rows: 4,"
        " max_length: 96}\ntrain: {batch_size: 8}\n"
    )
    run = tmp_path / "run"
    assert trainer_main(["--config", str(cfg), "--out", str(run)]) == 0
    capsys.readouterr()
    good = chat_sentiment(cl_data_root, tmp_path / "good.jsonl").read_text().splitlines()
    bad = write_jsonl(tmp_path / "bad.jsonl", [])
    bad.write_text(
        "\n".join([*good[:30], '{"messages": [{"role": "bot", "content": "x"}]}']) + "\n"
    )
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert trainer_main(["--out", str(run), "--add-task", f"s={bad}"]) == 2
    err = capsys.readouterr().err
    assert "line 31: message 1: unknown role 'bot'" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_validation_file_is_held_out_instead_of_a_share(tmp_path, tiny_model_dir, cl_data_root):
    titles = completion_titles(cl_data_root, tmp_path / "titles.jsonl")
    lines = titles.read_text().splitlines()
    train, valid = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    train.write_text("\n".join(lines[:40]) + "\n")
    valid.write_text("\n".join(lines[40:52]) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata: {{max_length: 160}}\ntrain: {{batch_size: 8}}\n"
    )
    run = tmp_path / "run"
    assert trainer_main(["--config", str(cfg), "--out", str(run), "--add-task", f"titles={train}:{valid}", "--stop-after", "1"]) == 0  # fmt: skip
    dev = json.loads((run / "tasks" / "titles" / "dev.json").read_text())
    assert [r["completion"] for r in dev] == [json.loads(x)["completion"] for x in lines[40:52]]
    assert len(json.loads((run / "tasks" / "titles" / "train.json").read_text())) == 40
