"""The vLLM server command line that `jlserve serve` builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from jlserve.engine.launch import WORKER_EXTENSION, vllm_server_argv, vllm_server_env
from jlserve.errors import ServeConfigError


def test_cpu_runs_eager_unless_the_user_chooses():
    argv = vllm_server_argv(Path("/m"), "127.0.0.1", 8000, [], on_cpu=True)
    assert "--enforce-eager" in argv and WORKER_EXTENSION in argv
    assert "--enforce-eager" not in vllm_server_argv(Path("/m"), "h", 1, [], on_cpu=False)
    user = vllm_server_argv(Path("/m"), "h", 1, ["-O", "3"], on_cpu=True)
    assert "--enforce-eager" not in user and user[-2:] == ["-O", "3"]


def test_flags_jlserve_owns_are_refused():
    with pytest.raises(ServeConfigError, match="--worker-extension-cls is set by jlserve"):
        vllm_server_argv(Path("/m"), "h", 1, ["--worker-extension-cls=x.Y"], on_cpu=True)


def test_cpu_gets_a_fixed_kv_cache_unless_set():
    assert vllm_server_env({}, {}, False, on_cpu=True)["VLLM_CPU_KVCACHE_SPACE"] == "4"
    mine = vllm_server_env({"VLLM_CPU_KVCACHE_SPACE": "1"}, {}, False, on_cpu=True)
    assert mine["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_server_env({}, {}, False, on_cpu=False)
