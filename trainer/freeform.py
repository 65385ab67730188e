"""Free-form tasks: a user's chat or prompt/completion examples (trainer/jsonl.py) as
training pairs, evaluation prompts and a generation metric.

Rows are the JSONL objects themselves ({"messages": [...]} or {"prompt", "completion"}).

- chat: each learned assistant turn (weight 1 or none given) is one training pair: the
  conversation before it, rendered by the tokenizer's chat template with the generation
  prompt, and the reply up to and including the template's end-of-turn token, so the loss
  covers exactly the assistant turns a /v1/chat/completions client would get. (A
  conversation with k learned turns gives k pairs: the same tokens are learned as with one
  sequence and a mask, at the cost of re-reading the shared prefix.)
- completion: the prompt's tokens, then the completion's and EOS.
- evaluation: greedy generation from the conversation before its last assistant turn (or
  the prompt); the reference is that turn's content (or the completion).
- metric: exact match (normalised) when a task's answers come from a small set
  (classification), else ROUGE-L F1 (Google's `rouge-score`).
"""

from __future__ import annotations

from typing import Any, Literal

from trainer.errors import TrainerError

Metric = Literal["exact", "rougeL"]
FORMATS = ("chat", "completion")
MAX_CLASSES = 20  # at most this many distinct answers: scored by exact match


def is_freeform(spec_or_format: Any) -> bool:
    return spec_or_format in FORMATS


def reference(row: dict[str, Any]) -> str:
    """The answer an evaluation compares with: the last assistant turn, or the completion."""
    if "messages" in row:
        return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "assistant")
    return row["completion"]


def choose_metric(rows: list[dict[str, Any]]) -> Metric:
    """exact when the answers form a small set (a classification task), else rougeL."""
    from trainer.data import normalize

    answers = {normalize(reference(r)) for r in rows}
    return "exact" if len(answers) <= MAX_CLASSES else "rougeL"


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (with stemming, rouge-score's usual setting for English)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def chat_pairs(template: Any, row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per learned assistant turn of a chat row."""
    messages = row["messages"]
    pairs = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        prompt = template.conversation_prompt(_turns(messages[:k]))
        pairs.append(
            (prompt, template.conversation_reply(_turns(messages[:k]), message["content"]))
        )
    if not pairs:
        raise TrainerError("a chat example has no learned assistant turn")  # validated before
    return pairs


def chat_eval_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation before its last assistant turn, as a chat client sends it."""
    messages = row["messages"]
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last]]


def chat_eval_prompt(template: Any, row: dict[str, Any]) -> list[int]:
    """The conversation before its last assistant turn, with the generation prompt."""
    turns = [(m["role"], m["content"]) for m in chat_eval_messages(row)]
    return template.conversation_prompt(turns)
