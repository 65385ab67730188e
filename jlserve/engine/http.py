"""vLLM's own HTTP pieces that the plugin reuses (only jlserve.engine imports vLLM)."""

from __future__ import annotations

from typing import Any


def add_inference_key_check(app: Any, key: str) -> None:
    """Guard `/v1/...` with `key` by vLLM's own middleware, exactly as `--api-key` would,
    but with the key read from a file instead of a command line or environment."""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    app.add_middleware(AuthenticationMiddleware, tokens=[key])
