import json
from pathlib import Path

from trainer.cli import main as trainer_main
from trainer.data import EvalResult
from trainer.evalcache import EvalCache


def _config(tmp_path: Path, model: Path, data: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model: {model}\n"
        f"data: {{root: {data}, tasks: [movie_sentiment, tweet_sentiment], train_rows: 8,"
        " eval_rows: 8, max_length: 96}\n"
        "train: {batch_size: 4, eval_batch_size: 8}\n"
        "method: {name: incLoRA}\n"
    )
    return path


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _entries(cache: Path) -> int:
    return len(list(cache.glob("*.json")))


def test_runs_on_one_base_share_the_base_row_and_nothing_else(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    """A second run on the same base, rows and evaluator reads from the cache every
    evaluation of a model it shares (planted values show it was read, not recomputed):
    the base row, and here version 1 too (seqLoRA's first task trains what incLoRA's
    does); its own version is evaluated. Another evaluator (batch size) or other rows
    evaluate everything again."""
    cfg, cache = _config(tmp_path, tiny_model_dir, cl_data_root), tmp_path / "cache"
    args = ["--config", str(cfg), "--eval-cache", str(cache)]
    assert trainer_main([*args, "--out", str(tmp_path / "a")]) == 0
    a = _metrics(tmp_path / "a")
    assert _entries(cache) == 2 + 2 + 2  # base row, then 2 tasks x 2 rows
    for entry in cache.glob("*.json"):  # plant values no evaluation gives
        planted = {**json.loads(entry.read_text()), "exact": 0.123, "loss": 12.5}
        entry.write_text(json.dumps(planted))

    assert trainer_main([*args, "--out", str(tmp_path / "b"), "--set", "method.name=seqLoRA"]) == 0
    b = _metrics(tmp_path / "b")
    acc, loss = b["accuracy"], b["loss"]
    assert acc["base"] == acc["matrix"][0] == [0.123, 0.123]  # read from the cache
    assert loss["base"] == loss["matrix"][0] == [12.5, 12.5]
    assert 0.123 not in acc["matrix"][1] and 12.5 not in loss["matrix"][1]  # its own version
    assert _entries(cache) == 6 + 2
    log = json.loads((tmp_path / "b" / "run.json").read_text())["task_log"]
    assert [t["eval_cached"] for t in log] == [2, 0]

    other_evaluator = ["--set", "train.eval_batch_size=4", "--out", str(tmp_path / "c")]
    assert trainer_main([*args, *other_evaluator]) == 0
    c = _metrics(tmp_path / "c")
    assert (c["accuracy"]["base"], c["accuracy"]["matrix"]) == (
        a["accuracy"]["base"],
        a["accuracy"]["matrix"],
    )  # evaluated again
    assert _entries(cache) == 8 + 6
    other_rows = ["--set", "data.eval_rows=4", "--out", str(tmp_path / "d")]
    assert trainer_main([*args, *other_rows]) == 0
    assert 0.123 not in _metrics(tmp_path / "d")["accuracy"]["base"]
    assert _entries(cache) == 14 + 6


def test_a_damaged_entry_is_evaluated_again(tmp_path, tiny_model_dir) -> None:
    cache = EvalCache(tmp_path / "cache", tiny_model_dir)
    cache.put("k", EvalResult(exact=0.5, prefix=0.75, n=8), loss=1.25)
    assert cache.get("k") == (EvalResult(0.5, 0.75, 8), 1.25)
    for damaged in ("{", '{"exact": 0.5}', "[]", '{"exact": "x", "prefix": 0, "n": 1, "loss": 0}'):
        (tmp_path / "cache" / "k.json").write_text(damaged)
        assert cache.get("k") is None, damaged
    assert cache.get("absent") is None
