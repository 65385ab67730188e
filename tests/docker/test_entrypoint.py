"""docker/entrypoint.sh, run outside Docker: what the images execute is what is tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jlserve.local_server import free_port
from tests.helpers.serving import ADMIN_TOKEN, STARTUP_TIMEOUT_S

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"
JLSERVE_BIN = str(Path(sys.executable).with_name("jlserve"))


def entrypoint_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    token = tmp_path / "admin_token"
    token.write_text(ADMIN_TOKEN)
    return {
        **os.environ,
        "JLSERVE_BIN": JLSERVE_BIN,
        "JLSERVE_MODEL": str(tmp_path / "models" / "tiny"),
        "JLSERVE_PREPARE": "tiny",
        "JLSERVE_STATE_DIR": str(tmp_path / "state"),
        "JLSERVE_ADMIN_TOKEN_FILE": str(token),
        "JLSERVE_HOST": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        **overrides,
    }


@pytest.mark.slow
def test_entrypoint_prepares_the_model_and_serves_with_admin_auth(tmp_path):
    port = free_port()
    env = entrypoint_env(tmp_path, JLSERVE_PORT=str(port))
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "--max-model-len", "256"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        assert (tmp_path / "models" / "tiny" / "model.safetensors").is_file()
        assert httpx.get(f"{url}/admin/status").status_code == 401
        status = httpx.get(
            f"{url}/admin/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert status.status_code == 200 and status.json()["version"] == 0
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "the world", "max_tokens": 4},
            timeout=60,
        )
        assert completion.status_code == 200
        assert completion.headers["x-jlserve-model-version"] == "0"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_entrypoint_refuses_to_start_without_the_admin_secret(tmp_path):
    env = entrypoint_env(tmp_path, JLSERVE_ADMIN_TOKEN_FILE=str(tmp_path / "missing"))
    env["JLSERVE_PREPARE"] = ""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    result = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "admin token file" in result.stderr and "missing" in result.stderr


def test_entrypoint_refuses_an_empty_model_dir_when_told_not_to_prepare(tmp_path):
    env = entrypoint_env(tmp_path, JLSERVE_PREPARE="")
    result = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no checkpoint" in result.stderr
