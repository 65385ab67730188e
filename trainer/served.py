"""Greedy generation through a running `jlserve serve`, for `--eval-via URL`.

The accuracy matrix is then measured on what is actually served. Prompts travel as the
same token ids the in-process evaluation uses (no re-tokenization on the server), with
temperature 0 and the same stop token and length, and every answer must carry the
expected `x-jlserve-model-fingerprint` header, so a number can never come from another
model than the one it is recorded for. The fingerprint, not the server's version
number, identifies the model: numbers are the server's own (after a rollback, another
server or a restarted run they name other weights).
"""

from __future__ import annotations

import os
import time

import httpx

from trainer.errors import TrainerError

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

    def wait_for_fingerprint(self, fingerprint: str, timeout_s: float = 300.0) -> None:
        """Block until the server serves the model `fingerprint` (a watched directory
        applies it later)."""
        deadline = time.monotonic() + timeout_s
        while True:
            response = self._get("/v1/models")
            self._model_name = response.json()["data"][0]["id"]
            served = response.headers.get(FINGERPRINT_HEADER)
            if served == fingerprint:
                self._ready = fingerprint
                return
            if time.monotonic() > deadline:
                raise TrainerError(
                    f"--eval-via {self.url}: still serving {served} after {timeout_s:.0f} s, "
                    f"waiting for {fingerprint}"
                )
            time.sleep(0.5)

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, stop_token: int, fingerprint: str
    ) -> list[str]:
        """Greedy continuations of token-id prompts, from the served model `fingerprint`."""
        if self._ready != fingerprint:
            self.wait_for_fingerprint(fingerprint)
        texts: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            body = {
                "model": self._model_name,
                "prompt": batch,
                "max_tokens": max_new_tokens,
                "temperature": 0,
                "stop_token_ids": [stop_token],
                "skip_special_tokens": True,
            }
            try:
                response = self._http.post("/v1/completions", json=body)
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
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            texts += [c["text"] for c in choices]
        return texts
