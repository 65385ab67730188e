"""`jlserve data cl-benchmark`: the public layout in, the project layout out, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jlserve.cli import main as jlserve_main
from tests.conftest import CL_BENCHMARK_DIR, needs_cl_benchmark
from trainer.layout import check_root

# The public layout (CL_Benchmark of cmnfriend/O-LoRA, CL_Benchmark_dev of JumpLoRA), as
# listed in those repositories: project task name -> folder, label set (labels.json).
PUBLIC = {
    "boolqa": ("BoolQA/BoolQA", ["True", "False"]),
    "copa": ("COPA/COPA", ["A", "B"]),
    "multirc": ("MultiRC/MultiRC", ["False", "True"]),
    "cb": ("NLI/CB", ["entailment", "contradiction", "neutral"]),
    "mnli": ("NLI/MNLI", ["neutral", "entailment", "contradiction"]),
    "rte": ("NLI/RTE", ["contradiction", "entailment"]),
    "qqp": ("QQP/QQP", ["False", "True"]),
    "imdb": ("SC/IMDB", ["Good", "Bad"]),
    "sst-2": ("SC/SST-2", ["Good", "Bad"]),
    "amazon": ("SC/amazon", ["very negative", "negative", "neutral", "positive", "very positive"]),
    "yelp": ("SC/yelp", ["very negative", "negative", "neutral", "positive", "very positive"]),
    "agnews": ("TC/agnews", ["World", "Sports", "Business", "Science or Technology"]),
    "dbpedia": ("TC/dbpedia", ["Company", "Educational Institution", "Artist", "Athlete",
                               "Office Holder", "Mean of Transportation", "Building",
                               "Natural Place", "Village", "Animal", "Plant", "Album", "Film",
                               "Written Work"]),
    "yahoo": ("TC/yahoo", ["Society & Culture", "Science & Mathematics", "Health",
                           "Education & Reference", "Computers & Internet", "Sports",
                           "Business & Finance", "Entertainment & Music",
                           "Family & Relationships", "Politics & Government"]),
    "wic": ("WiC/WiC", ["True", "False"]),
}  # fmt: skip
SPLITS = ("train", "dev", "test")


def make_source(root: Path, folder: str = "CL_Benchmark") -> Path:
    """A small checkout-shaped tree: <folder>/<category>/<Task>/{train,dev,test,labels}.json."""
    for name, (path, labels) in PUBLIC.items():
        task = root / folder / path
        task.mkdir(parents=True)
        (task / "labels.json").write_text(json.dumps(labels))
        for k, split in enumerate(SPLITS):
            rows = [{"label": labels[i % len(labels)], "sentence": f"{name} {split} {i}"}
                    for i in range(3 + k)]  # fmt: skip
            (task / f"{split}.json").write_text(json.dumps(rows))
    return root


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_lays_out_the_project_layout_exactly(tmp_path, capsys):
    source = make_source(tmp_path / "O-LoRA")
    out = tmp_path / "data" / "cl_benchmark"
    assert jlserve_main(["data", "cl-benchmark", "--source", str(source), "--out", str(out)]) == 0
    expected = {"tasks.json"} | {
        f"{name}/{f}.json" for name in PUBLIC for f in ("train", "dev", "labels")
    }
    assert files(out) == expected  # no test split, no stray staging directory
    assert [p.name for p in out.parent.iterdir()] == ["cl_benchmark"]
    for name, (path, labels) in PUBLIC.items():
        for split in ("train", "dev"):
            src = source / "CL_Benchmark" / path / f"{split}.json"
            assert (out / name / f"{split}.json").read_bytes() == src.read_bytes()
        assert json.loads((out / name / "labels.json").read_text()) == labels
    index = json.loads((out / "tasks.json").read_text())
    assert list(index["orders"]) == [f"short_order_{i}" for i in (1, 2, 3)] + [
        f"long_order_{i}" for i in (4, 5, 6)
    ]
    assert all(len(index["orders"][f"long_order_{i}"]) == 15 for i in (4, 5, 6))
    assert index["tasks"]["copa"]["instruction"] == ""
    assert index["tasks"]["agnews"]["instruction"].endswith("Choose one from the option.\n")
    assert check_root(out) == []
    printed = capsys.readouterr().out
    assert "wrote 15 tasks" in printed and "long_order_6" in printed


@needs_cl_benchmark
def test_the_layout_matches_the_benchmark_copy_byte_for_byte(tmp_path):
    out = tmp_path / "cl_benchmark"
    source = make_source(tmp_path / "O-LoRA")
    assert jlserve_main(["data", "cl-benchmark", "--source", str(source), "--out", str(out)]) == 0
    assert (out / "tasks.json").read_bytes() == (CL_BENCHMARK_DIR / "tasks.json").read_bytes()
    for name in PUBLIC:
        shared = (CL_BENCHMARK_DIR / name / "labels.json").read_bytes()
        assert (out / name / "labels.json").read_bytes() == shared


def test_the_jumplora_folder_and_the_folder_itself_are_found(tmp_path):
    source = make_source(tmp_path / "JumpLoRA", folder="CL_Benchmark_dev")
    for given, out in ((source, "a"), (source / "CL_Benchmark_dev", "b")):
        argv = ["data", "cl-benchmark", "--source", str(given), "--out", str(tmp_path / out)]
        assert jlserve_main(argv) == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_says_what_is_missing_and_writes_the_rest(tmp_path, capsys):
    source = make_source(tmp_path / "src")
    bench = source / "CL_Benchmark"
    (bench / "TC/yahoo/train.json").unlink()
    rows = json.loads((bench / "NLI/MNLI/dev.json").read_text())
    (bench / "NLI/MNLI/dev.json").write_text(json.dumps([*rows, {"label": "-", "sentence": "s"}]))
    out = tmp_path / "out"
    assert jlserve_main(["data", "cl-benchmark", "--source", str(source), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    left_out = captured.err.strip().splitlines()
    assert (
        left_out[0].startswith("left out: yahoo: ") and "yahoo/train.json: missing" in left_out[0]
    )
    assert "1 of 15 tasks left out" in left_out[1] and len(left_out) == 2
    assert "note: mnli:" in captured.out and "left out 1 rows labelled ['-']" in captured.out
    index = json.loads((out / "tasks.json").read_text())
    assert "yahoo" not in index["tasks"] and not (out / "yahoo").exists()
    assert index["orders"] == {}  # every order of the benchmark has yahoo
    assert json.loads((out / "mnli" / "dev.json").read_text()) == rows
    assert check_root(out) == []


@pytest.mark.parametrize("case", ["out exists", "no benchmark in source"])
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, capsys, case):
    source = make_source(tmp_path / "src") if case == "out exists" else tmp_path
    out = tmp_path / "out"
    if case == "out exists":
        out.mkdir()
    argv = ["data", "cl-benchmark", "--source", str(source), "--out", str(out)]
    assert jlserve_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jlserve: error: --")
    assert not (out.exists() and any(out.iterdir()))
