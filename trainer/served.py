"""Greedy generation through a running `jlserve serve`, for `--eval-via URL`.

The accuracy matrix is then measured on what is actually served, with temperature 0 and
the same stop token and length as in process, and every answer must carry the expected
`x-jlserve-model-fingerprint` header, so a number can never come from another model than
the one it is recorded for. The fingerprint, not the server's version number, identifies
the model: numbers are the server's own (after a rollback, another server or a restarted
run they name other weights).

- `plain` prompts travel to /v1/completions as the token ids the in-process evaluation
  uses (no re-tokenization on the server).
- `chat` prompts (and chat task files) travel to /v1/chat/completions as messages, the way
  any chat client asks; the server applies the chat template itself. Each answer carries the prompt ids the
  server built (`return_token_ids`), and they must equal the trainer's, so served and
  in-process evaluation provably see the same prompt.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

from trainer.errors import TrainerError

if TYPE_CHECKING:  # the CLI imports this module; torch only when a run starts
    from trainer.data import Encoder, Task

FINGERPRINT_HEADER = "x-jlserve-model-fingerprint"
API_KEY_ENV = "JLSERVE_API_KEY"  # the inference key, if the server was started with one


class ServedModel:
    def __init__(self, url: str, *, batch_size: int = 32, timeout_s: float = 300.0) -> None:
        key = os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.batch_size = batch_size
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._model_name: str | None = None
        self._ready: str | None = None  # the fingerprint last seen served

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str) -> httpx.Response:
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise TrainerError(f"--eval-via {self.url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise TrainerError(f"--eval-via {self.url}{path}: HTTP {response.status_code}")
        return response

    def serving(self) -> str | None:
        """The fingerprint of the model the server serves now."""
        response = self._get("/v1/models")
        self._model_name = response.json()["data"][0]["id"]
        return response.headers.get(FINGERPRINT_HEADER)

    def wait_for_fingerprint(self, fingerprint: str, timeout_s: float = 300.0) -> None:
        """Block until the server serves the model `fingerprint` (a watched directory
        applies it later)."""
        deadline = time.monotonic() + timeout_s
        while True:
            served = self.serving()
            if served == fingerprint:
                self._ready = fingerprint
                return
            if time.monotonic() > deadline:
                raise TrainerError(
                    f"--eval-via {self.url}: still serving {served} after {timeout_s:.0f} s, "
                    f"waiting for {fingerprint}"
                )
            time.sleep(0.5)

    def predict(self, enc: Encoder, task: Task, *, fingerprint: str) -> list[str]:
        """Greedy answers to the task's dev prompts in `enc`'s format, from the served model `fingerprint`."""
        n, stop = enc.max_target_len(task), enc.stop_for(task)
        if task.format == "completion" or (enc.chat is None and task.format != "chat"):
            return self.generate(
                enc.eval_prompts(task), max_new_tokens=n, stop_token=stop, fingerprint=fingerprint
            )
        return self.chat(
            enc.eval_chats(task), max_new_tokens=n, stop_token=stop, fingerprint=fingerprint
        )

    def _post(self, path: str, body: dict[str, Any], fingerprint: str) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise TrainerError(f"--eval-via {self.url}: request failed ({exc})") from None
        if response.status_code != 200:
            raise TrainerError(
                f"--eval-via {self.url}: HTTP {response.status_code}: {response.text[:300]}"
            )
        served = response.headers.get(FINGERPRINT_HEADER)
        if served != fingerprint:
            raise TrainerError(
                f"--eval-via {self.url}: answered by model {served}, expected {fingerprint}"
            )
        return response.json()

    def _sampling(self, max_new_tokens: int, stop_token: int) -> dict[str, Any]:
        return {
            "model": self._model_name,
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "stop_token_ids": [stop_token],
            "skip_special_tokens": True,
        }

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, stop_token: int, fingerprint: str
    ) -> list[str]:
        """Greedy continuations of token-id prompts (/v1/completions), from the served model `fingerprint`."""
        if self._ready != fingerprint:
            self.wait_for_fingerprint(fingerprint)
        texts: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            body = {
                **self._sampling(max_new_tokens, stop_token),
                "prompt": prompts[start : start + self.batch_size],
            }
            choices = sorted(self._post("/v1/completions", body, fingerprint)["choices"],
                             key=lambda c: c["index"])  # fmt: skip
            texts += [c["text"] for c in choices]
        return texts

    def chat(
        self, chats: list[tuple[list[dict[str, str]], list[int]]], *, max_new_tokens: int,
        stop_token: int, fingerprint: str,
    ) -> list[str]:  # fmt: skip
        """Greedy replies to chats (/v1/chat/completions), from the served model `fingerprint`.

        `chats` holds (messages, the prompt ids the trainer built from them); the server's
        own prompt ids must be the same. Requests run `batch_size` at a time so the server
        batches them (the chat API takes one conversation per request)."""
        if self._ready != fingerprint:
            self.wait_for_fingerprint(fingerprint)
        sampling = {**self._sampling(max_new_tokens, stop_token), "return_token_ids": True}

        def ask(chat: tuple[list[dict[str, str]], list[int]]) -> str:
            messages, expected = chat
            body = {**sampling, "messages": messages}
            answer = self._post("/v1/chat/completions", body, fingerprint)
            served = answer.get("prompt_token_ids")
            if served != expected:
                raise TrainerError(
                    f"--eval-via {self.url}: the server's chat prompt differs from the "
                    f"trainer's ({len(served or [])} vs {len(expected)} tokens); are both "
                    "using the same tokenizer and chat template?"
                )
            return answer["choices"][0]["message"]["content"] or ""

        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(ask, chats))
