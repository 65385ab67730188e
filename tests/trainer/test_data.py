"""Prompts, EOS-terminated targets, loss masking, left padding, row caps, normalisation."""

import pytest
from transformers import AutoTokenizer

from tests.conftest import CL_BENCHMARK_DIR
from trainer.config import DataConfig
from trainer.data import IGNORE_INDEX, Encoder, Task, load_stream, normalize
from trainer.errors import TrainerError

TASK = Task(
    name="t",
    instruction="Pick one.",
    options=["Good", "Bad"],
    train=[
        {"sentence": "the film was great " * 30, "label": "Good"},
        {"sentence": "bad", "label": "Bad"},
    ],
    dev=[{"sentence": "fine", "label": "Good"}],
)


@pytest.fixture(scope="module")
def enc(tiny_model_dir) -> Encoder:
    return Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), max_length=48)


def test_target_ends_with_eos_and_loss_covers_only_target(enc: Encoder) -> None:
    examples = enc.train_examples(TASK)
    prompt, target = examples[1]
    assert target[-1] == enc.eos
    assert enc.tok.decode(prompt).endswith("Text: bad\nAnswer:")
    assert enc.tok.decode(target, skip_special_tokens=True) == " Bad"
    batch = enc.collate(examples)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels[1, : len(prompt)].eq(IGNORE_INDEX).all()
    assert labels[1, len(prompt) : len(prompt) + len(target)].tolist() == target
    assert labels[1, len(prompt) + len(target) :].eq(IGNORE_INDEX).all()  # right padding
    assert mask[1].sum() == len(prompt) + len(target)


def test_long_text_is_cut_inside_the_sentence(enc: Encoder) -> None:
    prompt, _ = enc.train_examples(TASK)[0]
    assert len(prompt) + enc.max_target_len(TASK) <= 48
    assert enc.tok.decode(prompt).endswith("\nAnswer:")


def test_generation_batches_are_left_padded(enc: Encoder) -> None:
    ids, mask = enc.left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [enc.pad, enc.pad, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_normalize_lowercases_and_collapses_whitespace() -> None:
    assert normalize("  Science  or\nTechnology ") == "science or technology"


def test_load_stream_order_caps_and_errors() -> None:
    cfg = DataConfig(root=CL_BENCHMARK_DIR, order="short_order_1", train_rows=5, eval_rows=3)
    tasks = load_stream(cfg, seed=1)
    assert [t.name for t in tasks] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert all(len(t.train) == 5 and len(t.dev) == 3 for t in tasks)
    assert load_stream(cfg, seed=1)[0].train == tasks[0].train  # seeded
    assert load_stream(cfg, seed=2)[0].train != tasks[0].train
    assert "Choose one" in tasks[0].instruction and tasks[0].options[0] == "Company"
    with pytest.raises(TrainerError, match="unknown order"):
        load_stream(DataConfig(root=CL_BENCHMARK_DIR, order="nope"), seed=0)
    with pytest.raises(TrainerError, match="not in"):
        load_stream(DataConfig(root=CL_BENCHMARK_DIR, tasks=["nope"]), seed=0)
