"""Settings of the jlserve plugin inside vLLM's server process.

The plugin runs in two ways, with the same settings:

- under `jlserve serve`, which checks its flags and passes them as one JSON variable
  (`JLSERVE_SERVE_CONFIG`) to vLLM's server;
- under vLLM's own server (`VLLM_PLUGINS=jlserve python -m vllm.entrypoints.openai.
  api_server ...`), configured by one `JLSERVE_*` variable per setting (`ENV_VARS`).

Either way the model and the bind address are vLLM's own (`--model`, `--host`,
`--uds`), read from vLLM's parsed arguments: the admin guard decides on the address
vLLM really binds. Secrets never travel in the environment or on a command line: the
admin token and the inference key stay in their files and the plugin reads them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jlserve.errors import ServeConfigError
from jlserve.vocab import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DrainTimeoutAction,
    SwapPolicy,
)

CONFIG_ENV = "JLSERVE_SERVE_CONFIG"
MIN_TOKEN_CHARS = 16


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path | None = None  # default: default_state_dir(vLLM's --model)
    admin_token_file: Path | None = None
    insecure_admin: bool = False
    api_key_file: Path | None = None  # inference key for /v1 (vLLM's own key check)
    watch_dir: Path | None = None
    watch_interval_s: float = Field(1.0, gt=0)
    swap_policy: SwapPolicy = SwapPolicy.DRAIN
    drain_timeout_s: float = Field(30.0, gt=0)
    drain_timeout_action: DrainTimeoutAction = DrainTimeoutAction.REFUSE
    engine_timeout_s: float = Field(300.0, gt=0)
    max_delta_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, ge=1)
    rehash_base: bool = False  # ignore the state dir's digest cache (jlserve.digest_cache)
    # fine-tuning jobs (jlserve.jobs): their own token (default: the admin token)
    training_token_file: Path | None = None
    jobs_dir: Path | None = None  # the jobs' database and files (default: STATE_DIR/jobs)
    max_file_bytes: int = Field(DEFAULT_MAX_UPLOAD_BYTES, ge=1)
    job_lease_s: float = Field(DEFAULT_LEASE_S, ge=1)

    def to_env(self) -> dict[str, str]:
        return {CONFIG_ENV: self.model_dump_json(exclude_defaults=True)}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServeConfig:
        """From `JLSERVE_SERVE_CONFIG` (jlserve serve), else the `JLSERVE_*` variables."""
        try:
            if env.get(CONFIG_ENV):
                return cls.model_validate_json(env[CONFIG_ENV])
            return cls.model_validate({f: env[v] for f, v in ENV_VARS.items() if env.get(v)})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ENV_VARS.get(str(err["loc"][0]), CONFIG_ENV) if err["loc"] else CONFIG_ENV
            raise ServeConfigError(f"{where}: {err['msg']}") from None


# Plugin mode under vLLM's own server: one variable per setting.
ENV_VARS = {
    "state_dir": "JLSERVE_STATE_DIR",
    "admin_token_file": "JLSERVE_ADMIN_TOKEN_FILE",
    "insecure_admin": "JLSERVE_INSECURE_ADMIN",
    "api_key_file": "JLSERVE_API_KEY_FILE",
    "watch_dir": "JLSERVE_WATCH",
    "watch_interval_s": "JLSERVE_WATCH_INTERVAL",
    "swap_policy": "JLSERVE_SWAP_POLICY",
    "drain_timeout_s": "JLSERVE_DRAIN_TIMEOUT",
    "drain_timeout_action": "JLSERVE_DRAIN_TIMEOUT_ACTION",
    "engine_timeout_s": "JLSERVE_ENGINE_TIMEOUT",
    "max_delta_bytes": "JLSERVE_MAX_DELTA_BYTES",
    "rehash_base": "JLSERVE_REHASH_BASE",
    "training_token_file": "JLSERVE_TRAINING_TOKEN_FILE",
    "jobs_dir": "JLSERVE_JOBS_DIR",
    "max_file_bytes": "JLSERVE_MAX_FILE_BYTES",
    "job_lease_s": "JLSERVE_JOB_LEASE",
}


def default_state_dir(model: Path) -> Path:
    """One state dir per model path, so two models never share versions by accident."""
    root = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "jlserve"
    resolved = Path(model).resolve()
    return root / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"


def is_loopback(host: str | None) -> bool:
    """Whether binding `host` exposes only this machine. None or "" (vLLM's default)
    binds every interface; a name counts only if every address it resolves to is
    loopback."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def read_secret_file(path: Path, what: str) -> str:
    """One word of at least MIN_TOKEN_CHARS from `path`; the value is never echoed."""
    try:
        secret = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeConfigError(f"{path}: cannot read {what} ({exc})") from None
    if len(secret) < MIN_TOKEN_CHARS or any(c.isspace() for c in secret):
        raise ServeConfigError(
            f"{path}: the {what} must be one word of at least {MIN_TOKEN_CHARS} characters"
        )
    return secret


def read_admin_token(config: ServeConfig, host: str | None, uds: str | None = None) -> str | None:
    """The admin token, or None in the explicit insecure local mode.

    `host` / `uds` are what vLLM binds. Refuses every other combination, so admin routes
    never run unguarded by accident.
    """
    if config.admin_token_file is None:
        local = uds is not None or is_loopback(host)
        where = f"unix:{uds}" if uds else repr(host or "0.0.0.0")
        if config.insecure_admin and local:
            return None
        if config.insecure_admin:
            raise ServeConfigError(
                f"--insecure-admin is only allowed on a loopback host, and vLLM binds {where}"
            )
        raise ServeConfigError(
            "admin routes need a token: pass --admin-token-file FILE "
            "(or --insecure-admin with --host 127.0.0.1 for local experiments)"
        )
    return read_secret_file(config.admin_token_file, "admin token")


def read_training_token(config: ServeConfig, admin_token: str | None) -> str | None:
    """The token of the fine-tuning routes: its own file, else the admin token (None in
    the insecure local mode, as the admin routes)."""
    if config.training_token_file is None:
        return admin_token
    return read_secret_file(config.training_token_file, "training token")
