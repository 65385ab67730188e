"""Prompts, EOS-terminated targets, loss masking, left padding, row caps, normalisation."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

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


def test_load_stream_order_caps_and_errors(cl_data_root) -> None:
    cfg = DataConfig(root=cl_data_root, order="demo", train_rows=5, eval_rows=3)
    tasks = load_stream(cfg, seed=1)
    assert [t.name for t in tasks] == ["bbc_topic", "movie_sentiment", "tweet_sentiment"]
    assert all(len(t.train) == 5 and len(t.dev) == 3 for t in tasks)
    assert load_stream(cfg, seed=1)[0].train == tasks[0].train  # seeded
    assert load_stream(cfg, seed=2)[0].train != tasks[0].train
    assert "Choose one" in tasks[0].instruction and tasks[0].options[0] == "Business"
    with pytest.raises(TrainerError, match="unknown order"):
        load_stream(DataConfig(root=cl_data_root, order="nope"), seed=0)
    with pytest.raises(TrainerError, match="not in"):
        load_stream(DataConfig(root=cl_data_root, tasks=["nope"]), seed=0)


# ---------------------------------------------------------------- data.prompt_format: chat

CHAT_TASK = Task(
    name="t",
    instruction="Pick one.",
    options=["Good", "Bad"],
    train=[{"sentence": "a fine film", "label": "Good"}, {"sentence": "dull", "label": "Bad"}],
    dev=[{"sentence": "the film was great " * 40, "label": "Good"}],
)


def _template_ids(tok, messages: list[dict[str, str]], generation: bool) -> list[int]:
    """What the tokenizer's own template call gives (what vLLM's chat endpoint does)."""
    return list(
        tok.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=True, return_dict=False
        )
    )


def _chat_round_trip(model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = Encoder(tok, max_length=512, prompt_format="chat")
    assert enc.stop == tok.convert_tokens_to_ids("<|im_end|>")  # ChatML's end of turn
    for (prompt, target), row in zip(enc.train_examples(CHAT_TASK), CHAT_TASK.train, strict=True):
        user = {"role": "user", "content": Encoder.user_text(CHAT_TASK, row["sentence"])}
        reply = {"role": "assistant", "content": row["label"]}
        assert prompt == _template_ids(tok, [user], generation=True)
        full = _template_ids(tok, [user, reply], generation=False)
        assert full[: len(prompt) + len(target)] == prompt + target
        assert target[-1] == enc.stop and enc.stop not in target[:-1]
        assert tok.decode(target, skip_special_tokens=True) == row["label"]


def test_chat_prompts_round_trip_through_the_template_tiny(tiny_model_dir) -> None:
    _chat_round_trip(tiny_model_dir)


@pytest.mark.slow
def test_chat_prompts_round_trip_through_the_template_smollm2(smollm2_dir) -> None:
    _chat_round_trip(smollm2_dir)


def test_a_long_chat_text_is_cut_and_stays_a_template_prompt(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = Encoder(tok, max_length=64, prompt_format="chat")
    [([message], ids)] = enc.eval_chats(CHAT_TASK)
    user = message["content"]
    assert len(ids) + enc.max_target_len(CHAT_TASK) <= 64
    assert len(user) < len(Encoder.user_text(CHAT_TASK, CHAT_TASK.dev[0]["sentence"]))
    assert user.startswith("Task Instruction: Pick one.\nOptions: Good | Bad\nText: the film")
    assert ids == _template_ids(tok, [{"role": "user", "content": user}], generation=True)
    assert enc.eval_prompts(CHAT_TASK) == [ids]


def test_chat_without_a_template_is_a_typed_error(tiny_model_dir, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(TrainerError, match="no chat template; use plain"):
        Encoder(tok, max_length=64, prompt_format="chat")


def test_generation_stops_at_the_end_of_turn_token(tiny_model_dir, tmp_path) -> None:
    """A model taught to go on talking after its end-of-turn token: with EOS set to another
    token, the stop is still the template's end of turn, and the answer ends there."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import generate_greedy

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({**config, "eos_token": "<|endoftext|>"})
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = Encoder(tok, max_length=96, prompt_format="chat")
    assert enc.stop == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    prompt, target = enc.train_examples(CHAT_TASK)[0]
    chatter = enc.tok(" Bad Bad Bad", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + target + chatter])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cpu = torch.device("cpu")
    assert generate_greedy(model, enc, [prompt], 8, 1, cpu) == ["Good"]
    # The same model without the end-of-turn stop goes on: the stop is what ends the answer.
    out = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=len(target) + len(chatter),
        do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=enc.pad,
    )  # fmt: skip
    assert out[0, len(prompt) :].tolist() == target + chatter


def test_held_out_loss_equals_the_loss_of_each_row_alone(tiny_model_dir) -> None:
    """The batched, left-padded loss over the last positions only is the mean target-token
    cross-entropy each row gets from a full forward pass of its own."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import held_out_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enc = Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), max_length=48)
    rows = [
        {"sentence": "the film was great " * 9, "label": "Good"},
        {"sentence": "bad", "label": "Bad"},
        {"sentence": "fine, I suppose", "label": "Good"},
    ]
    task = Task(name="t", instruction="Pick one.", options=["Good", "Bad"], train=[], dev=rows)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, target in enc.pairs(task, rows):
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0]  # (L, V)
            predicted = logits[len(prompt) - 1 : -1]  # (len(target), V)
            total += float(torch.nn.functional.cross_entropy(
                predicted, torch.tensor(target), reduction="sum"
            ))  # fmt: skip
            count += len(target)
    batched = held_out_loss(model, enc, task, batch_size=2, device=torch.device("cpu"))
    assert batched == pytest.approx(total / count, rel=1e-5)
