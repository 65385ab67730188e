"""Settings of `jlserve serve` that reach the admin plugin inside vLLM's server process.

vLLM parses its own command line, so jlserve's settings travel in one environment
variable as JSON (`JLSERVE_SERVE_CONFIG`), validated on both sides by this model. Secrets
do not travel: the admin token stays in its file and is read by the plugin.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jlserve.delta.format import DEFAULT_MAX_FILE_BYTES
from jlserve.engine.protocol import SwapPolicy
from jlserve.errors import ServeConfigError

CONFIG_ENV = "JLSERVE_SERVE_CONFIG"
MIN_TOKEN_CHARS = 16


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path
    state_dir: Path
    host: str
    admin_token_file: Path | None = None
    insecure_admin: bool = False
    watch_dir: Path | None = None
    watch_interval_s: float = Field(1.0, gt=0)
    swap_policy: SwapPolicy = SwapPolicy.DRAIN
    max_delta_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, ge=1)

    def to_env(self) -> dict[str, str]:
        return {CONFIG_ENV: self.model_dump_json()}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServeConfig:
        raw = env.get(CONFIG_ENV)
        if not raw:
            raise ServeConfigError(
                f"{CONFIG_ENV} is not set: start the server with `jlserve serve`, "
                "which configures the jlserve vLLM plugin"
            )
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ServeConfigError(f"{CONFIG_ENV}: invalid ({exc})") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_admin_token(config: ServeConfig) -> str | None:
    """The admin token, or None in the explicit insecure loopback mode.

    Refuses every other combination, so admin routes never run unguarded by accident.
    """
    if config.admin_token_file is None:
        if config.insecure_admin and is_loopback(config.host):
            return None
        if config.insecure_admin:
            raise ServeConfigError(
                f"--insecure-admin is only allowed on a loopback host, not {config.host!r}"
            )
        raise ServeConfigError(
            "admin routes need a token: pass --admin-token-file FILE "
            "(or --insecure-admin with --host 127.0.0.1 for local experiments)"
        )
    try:
        token = config.admin_token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeConfigError(
            f"{config.admin_token_file}: cannot read admin token ({exc})"
        ) from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ServeConfigError(
            f"{config.admin_token_file}: the admin token must be one word of at least "
            f"{MIN_TOKEN_CHARS} characters"
        )
    return token
