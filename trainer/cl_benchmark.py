"""The Standard CL Benchmark and the Long Sequence Benchmark, laid out from the public source.

The 15 tasks are distributed as the `CL_Benchmark_dev` folder of the JumpLoRA repository
(github.com/alexandra-dragomir/JumpLoRA; its dev splits are subsamples) and the
`CL_Benchmark` folder of the O-LoRA repository (github.com/cmnfriend/O-LoRA; there dev.json
is the full test split), both shaped `<category>/<Task>/{train,dev,test}.json` plus
`labels.json`. The test splits are not copied: the trainer evaluates on dev. The instructions are
the O-LoRA per-category instructions (configs/instruction_config.json there; COPA has
none), the options are the label sets, and the orders 1-6 are those of the O-LoRA and
JumpLoRA papers (short_order_1..3: 4 tasks; long_order_4..6: 15 tasks). They are written
here so that a checkout of the data alone suffices.

`build(source, out)` writes the project layout (trainer/layout.py) into a temporary
sibling of `out`, checks it with `check_root`, and only then renames it to `out`; what the
source lacks is reported, never invented.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import TrainerError
from trainer.layout import INDEX, LABELS, SPLITS, check_root, labels_problem, read_rows

SOURCE_FOLDERS = ("CL_Benchmark", "CL_Benchmark_dev")  # O-LoRA, JumpLoRA

_NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
INSTRUCTIONS = {  # per category, as distributed
    "BoolQA": "According to the following passage, is the question true or false? ",
    "COPA": "",
    "MultiRC": "According to the following passage and question, is the candidate answer "
    "true or false? ",
    "NLI": _NLI,
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? ',
    "SC": "What is the sentiment of the following paragraph? ",
    "TC": "What is the topic of the following paragraph? ",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in "
    "both sentence? ",
}
CHOOSE = "Choose one from the option.\n"

SENTIMENT_5 = ["very negative", "negative", "neutral", "positive", "very positive"]
# name -> (source folder under CL_Benchmark, options = the task's labels.json)
TASKS: dict[str, tuple[str, list[str]]] = {
    "boolqa": ("BoolQA/BoolQA", ["True", "False"]),
    "copa": ("COPA/COPA", ["A", "B"]),
    "multirc": ("MultiRC/MultiRC", ["False", "True"]),
    "cb": ("NLI/CB", ["entailment", "contradiction", "neutral"]),
    "mnli": ("NLI/MNLI", ["neutral", "entailment", "contradiction"]),
    "rte": ("NLI/RTE", ["contradiction", "entailment"]),
    "qqp": ("QQP/QQP", ["False", "True"]),
    "imdb": ("SC/IMDB", ["Good", "Bad"]),
    "sst-2": ("SC/SST-2", ["Good", "Bad"]),
    "amazon": ("SC/amazon", SENTIMENT_5),
    "yelp": ("SC/yelp", SENTIMENT_5),
    "agnews": ("TC/agnews", ["World", "Sports", "Business", "Science or Technology"]),
    "dbpedia": (
        "TC/dbpedia",
        [
            "Company",
            "Educational Institution",
            "Artist",
            "Athlete",
            "Office Holder",
            "Mean of Transportation",
            "Building",
            "Natural Place",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "Written Work",
        ],
    ),
    "yahoo": (
        "TC/yahoo",
        [
            "Society & Culture",
            "Science & Mathematics",
            "Health",
            "Education & Reference",
            "Computers & Internet",
            "Sports",
            "Business & Finance",
            "Entertainment & Music",
            "Family & Relationships",
            "Politics & Government",
        ],
    ),
    "wic": ("WiC/WiC", ["True", "False"]),
}
ORDERS = {
    "short_order_1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "short_order_2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "short_order_3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "long_order_4": ["mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp",
                     "amazon", "sst-2", "dbpedia", "agnews", "multirc", "yahoo"],
    "long_order_5": ["multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb",
                     "sst-2", "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
    "long_order_6": ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2",
                     "dbpedia", "agnews", "yahoo", "multirc", "boolqa", "wic"],
}  # fmt: skip


def task_spec(name: str) -> dict[str, object]:
    """One task's entry of tasks.json."""
    folder, options = TASKS[name]
    category = folder.split("/")[0]
    instruction = INSTRUCTIONS[category] + CHOOSE if INSTRUCTIONS[category] else ""
    return {
        "category": category,
        "instruction": instruction,
        "options": options,
        "text_key": "sentence",
        "label_key": "label",
    }


@dataclass
class BuildReport:
    out: Path
    written: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> split -> rows
    missing: list[str] = field(default_factory=list)  # one line per task left out, and why
    notes: list[str] = field(default_factory=list)  # rows left out of a written task
    orders: list[str] = field(default_factory=list)  # orders whose tasks were all written

    @property
    def complete(self) -> bool:
        return not self.missing


def find_benchmark(source: Path) -> Path:
    """The CL_Benchmark folder: `source` itself, or one of SOURCE_FOLDERS inside it."""
    categories = {folder.split("/")[0] for folder, _ in TASKS.values()}
    for candidate in (source, *(source / name for name in SOURCE_FOLDERS)):
        if candidate.is_dir() and any((candidate / c).is_dir() for c in categories):
            return candidate
    raise TrainerError(
        f"--source {source}: no benchmark folder there (expected {sorted(categories)} "
        f"folders in it, or in {' or '.join(SOURCE_FOLDERS)}/ inside it)"
    )


def _copy_task(bench: Path, name: str, staging: Path, report: BuildReport) -> None:
    """Copy one task's splits, leaving out rows whose label is not an option (the MNLI
    rows labelled "-", which have no gold label), with a note; or report why it cannot."""
    folder, options = TASKS[name]
    src = bench / folder
    problem = labels_problem(src / LABELS, options)
    splits: dict[str, list[dict[str, str]]] = {}
    whole: set[str] = set()  # splits copied byte for byte
    for split in SPLITS:
        path = src / f"{split}.json"
        if problem is None and not path.is_file():
            problem = f"{path}: missing"
        if problem is not None:
            break
        try:
            rows = read_rows(path)
        except TrainerError as exc:
            problem = str(exc)
            break
        splits[split] = [r for r in rows if r["label"] in options]
        dropped = sorted({r["label"] for r in rows} - set(options))
        if not splits[split]:
            problem = f"{path}: no row has a label among the options {options}"
        elif dropped:
            n = len(rows) - len(splits[split])
            report.notes.append(f"{name}: {path}: left out {n} rows labelled {dropped}")
        else:
            whole.add(split)
    if problem is not None:
        report.missing.append(f"{name}: {problem}")
        return
    dest = staging / name
    dest.mkdir()
    for split, rows in splits.items():
        target = dest / f"{split}.json"
        if split in whole:
            shutil.copyfile(src / f"{split}.json", target)  # as distributed, byte for byte
        else:
            target.write_text(json.dumps(rows, ensure_ascii=False))
        report.written.setdefault(name, {})[split] = len(rows)
    (dest / LABELS).write_text(json.dumps(options))


def build(source: Path, out: Path) -> BuildReport:
    """Lay out every task the source has into `out` (which must not exist yet)."""
    if out.exists():
        raise TrainerError(f"--out {out}: exists; remove it or choose another directory")
    bench = find_benchmark(source)
    report = BuildReport(out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in TASKS:
            _copy_task(bench, name, staging, report)
        if not report.written:
            raise TrainerError(f"--source {bench}: none of the {len(TASKS)} tasks is usable")
        report.orders = [o for o, names in ORDERS.items() if set(names) <= set(report.written)]
        index = {
            "tasks": {name: task_spec(name) for name in TASKS if name in report.written},
            "orders": {o: ORDERS[o] for o in report.orders},
        }
        (staging / INDEX).write_text(json.dumps(index, indent=1))
        problems = check_root(staging)
        if problems:  # what was copied must read back as a valid root
            raise TrainerError(f"the written layout does not check: {problems[0]}")
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report
