"""The vLLM server command line that `jlserve serve` builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jlserve.engine.launch import (
    LOAD_FORMAT,
    STATE_DIR_KEY,
    WORKER_EXTENSION,
    vllm_server_argv,
    vllm_server_env,
)
from jlserve.errors import ServeConfigError


def argv(extra: list[str], on_cpu: bool = True) -> list[str]:
    return vllm_server_argv(Path("/m"), "m", "127.0.0.1", 8000, extra, on_cpu=on_cpu)


def test_cpu_runs_eager_unless_the_user_chooses():
    assert "--enforce-eager" in argv([]) and WORKER_EXTENSION in argv([])
    assert "--enforce-eager" not in argv([], on_cpu=False)
    user = argv(["-O", "3"])
    assert "--enforce-eager" not in user and user[-2:] == ["-O", "3"]
    assert "--enforce-eager" not in argv(["--enforce_eager"])  # any spelling is the user's choice


def test_clients_see_the_served_model_name_not_the_path():
    command = argv([])
    assert command[command.index("--served-model-name") + 1] == "m"


@pytest.mark.parametrize(
    ("arg", "flag"),
    [
        ("--worker-extension-cls=x.Y", "--worker-extension-cls"),
        ("--worker_extension_cls", "--worker-extension-cls"),
        ("--host=0.0.0.0", "--host"),
        ("--hos", "--host"),  # argparse accepts unambiguous abbreviations
        ("--api_key=sk-secret", "--api-key"),  # a secret on a command line
        ("--config", "--config"),  # a YAML file could set any reserved flag unseen
        ("--served_model_name=x", "--served-model-name"),
        ("--api-server-count=2", "--api-server-count"),
    ],
)
def test_flags_jlserve_owns_are_refused_in_every_spelling(arg, flag):
    with pytest.raises(ServeConfigError, match=f"\\({flag}\\) is set by jlserve serve"):
        argv([arg, "1"])


def test_secrets_in_the_environment_never_reach_the_server():
    env = vllm_server_env({"JLSERVE_ADMIN_TOKEN": "t" * 20, "VLLM_API_KEY": "k" * 20}, {}, False)
    assert "JLSERVE_ADMIN_TOKEN" not in env and "VLLM_API_KEY" not in env


def test_cpu_gets_a_fixed_kv_cache_unless_set():
    assert vllm_server_env({}, {}, False, on_cpu=True)["VLLM_CPU_KVCACHE_SPACE"] == "4"
    mine = vllm_server_env({"VLLM_CPU_KVCACHE_SPACE": "1"}, {}, False, on_cpu=True)
    assert mine["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_server_env({}, {}, False, on_cpu=False)


def test_the_engine_loads_through_jlserves_loader_unless_the_user_chose_one():
    with_state = vllm_server_argv(
        Path("/m"), "m", "127.0.0.1", 8000, [], on_cpu=True, state_dir=Path("/s")
    )
    assert with_state[with_state.index("--load-format") + 1] == LOAD_FORMAT
    extra = json.loads(with_state[with_state.index("--model-loader-extra-config") + 1])
    assert extra == {STATE_DIR_KEY: "/s"}
    mine = vllm_server_argv(
        Path("/m"),
        "m",
        "127.0.0.1",
        8000,
        ["--load-format", "pt"],
        on_cpu=True,
        state_dir=Path("/s"),
    )
    assert mine.count("--load-format") == 1 and mine[-2:] == ["--load-format", "pt"]
