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


def _accuracy(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["accuracy"]


def test_runs_on_one_base_share_the_base_row_and_nothing_else(
    tmp_path, tiny_model_dir, cl_data_root
) -> None:
    """A second run on the same base, rows and evaluator reads from the cache every
    evaluation of a model it shares (a planted value shows it was read, not recomputed):
    the base row, and here version 1 too (seqLoRA's first task trains what incLoRA's
    does); its own version is evaluated. Another evaluator (batch size) evaluates all."""
    cfg, cache = _config(tmp_path, tiny_model_dir, cl_data_root), tmp_path / "cache"
    args = ["--config", str(cfg), "--eval-cache", str(cache)]
    assert trainer_main([*args, "--out", str(tmp_path / "a")]) == 0
    a = _accuracy(tmp_path / "a")
    assert len(list(cache.glob("*.json"))) == 2 + 2 + 2  # base row, then 2 tasks x 2 rows
    for entry in cache.glob("*.json"):  # plant a value no evaluation gives
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "exact": 0.123}))

    assert trainer_main([*args, "--out", str(tmp_path / "b"), "--set", "method.name=seqLoRA"]) == 0
    b = _accuracy(tmp_path / "b")
    assert b["base"] == b["matrix"][0] == [0.123, 0.123]  # read from the cache
    assert 0.123 not in b["matrix"][1]  # version 2 is its own: evaluated
    assert len(list(cache.glob("*.json"))) == 6 + 2

    other = ["--set", "train.eval_batch_size=4", "--out", str(tmp_path / "c")]
    assert trainer_main([*args, *other]) == 0
    c = _accuracy(tmp_path / "c")
    assert (c["base"], c["matrix"]) == (a["base"], a["matrix"])  # evaluated again
    assert len(list(cache.glob("*.json"))) == 8 + 6


def test_a_damaged_entry_is_evaluated_again(tmp_path) -> None:
    cache = EvalCache(tmp_path)
    cache.put("k", EvalResult(exact=0.5, prefix=0.75, n=8), loss=1.25)
    assert cache.get("k") == (EvalResult(0.5, 0.75, 8), 1.25)
    for damaged in ("{", '{"exact": 0.5}', "[]", '{"exact": "x", "prefix": 0, "n": 1, "loss": 0}'):
        (tmp_path / "k.json").write_text(damaged)
        assert cache.get("k") is None, damaged
    assert cache.get("absent") is None
