"""Plugin mode: jlserve inside vLLM's own server, started as vLLM documents it
(`VLLM_PLUGINS=jlserve python -m vllm.entrypoints.openai.api_server ...`), configured
by `JLSERVE_*` variables. The admin guard reads the address vLLM really binds, and
every failure stops the server instead of serving without jlserve or at a version
other than the recorded one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from jlserve.engine.launch import VLLM_SERVER_MODULE, WORKER_EXTENSION
from jlserve.faults import FAULT_ENV
from jlserve.local_server import LocalServer
from tests.helpers.serving import ENGINE_ARGS, STARTUP_TIMEOUT_S, refused_start

pytestmark = pytest.mark.slow

GUARD_ENTRY = "jlserve = jlserve.server.guard:register"


@dataclass
class VllmWithPlugin(LocalServer):
    """vLLM's own server with jlserve named in VLLM_PLUGINS; `host` is vLLM's --host."""

    host: str = "127.0.0.1"
    plugin_env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    worker_extension: str | None = WORKER_EXTENSION  # None: vLLM's flag left out

    def command(self) -> list[str]:
        extension = ["--worker-extension-cls", self.worker_extension]
        return [
            sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(self.model),
            *(extension if self.worker_extension else []), "--host", self.host,
            "--port", str(self.port), *ENGINE_ARGS,
            # the checkpoint's bf16: on CPUs with AMX a swap reloads SGL-packed layers, which
            # crashed vLLM 0.32's AMX attention (jlserve.engine.cpu_attention)
        ]  # fmt: skip

    def exit_code(self, timeout_s: float) -> int:
        """Wait for a server that must refuse to start."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()


def _guard_site(root: Path) -> Path | None:
    """The fail-closed guard is a `vllm.general_plugins` entry of jlserve's package
    metadata. An install made before it existed (a shared development environment)
    lacks it; a metadata-only distribution on PYTHONPATH supplies it then."""
    from importlib.metadata import entry_points

    if any(
        e.value == "jlserve.server.guard:register"
        for e in entry_points(group="vllm.general_plugins")
    ):
        return None
    info = root / "guard-site" / "jlserve_guard-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jlserve-guard\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{GUARD_ENTRY}\n")
    return info.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plugin-env")
    site = _guard_site(root)
    repo = str(Path(__file__).resolve().parents[3])
    path = ":".join([repo, *([str(site)] if site else [])])
    return {"VLLM_PLUGINS": "jlserve", "PYTHONPATH": path, "VLLM_CPU_KVCACHE_SPACE": "1"}


def server(delta_chain, root: Path, name: str, env: dict[str, str], **kw) -> VllmWithPlugin:
    return VllmWithPlugin(
        model=delta_chain.base,
        state_dir=root / "state",
        log_path=root / f"{name}.log",
        env={**env, "JLSERVE_STATE_DIR": str(root / "state"), **kw.pop("extra_env", {})},
        **kw,
    )


def test_plugin_mode_end_to_end_and_restart_on_the_recorded_version(delta_chain, env, tmp_path):
    main = server(delta_chain, tmp_path, "main", env, extra_env={"JLSERVE_INSECURE_ADMIN": "1"})
    main.start().wait_ready()
    try:
        st = httpx.get(f"{main.url}/admin/status").json()
        assert st["version"] == 0
        r = httpx.post(
            f"{main.url}/admin/deltas", content=delta_chain.deltas[0].read_bytes(), timeout=120
        )
        assert r.status_code == 200, r.text
        applied = r.json()
        completion = httpx.post(
            f"{main.url}/v1/completions",
            json={"model": str(delta_chain.base), "prompt": "the world", "max_tokens": 4},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
        assert completion.headers["x-jlserve-model-fingerprint"] == applied["fingerprint"]
        main.stop()
        main.start().wait_ready()
        again = httpx.get(f"{main.url}/admin/status").json()
        assert (again["version"], again["fingerprint"]) == (1, applied["fingerprint"])
        log = main.log_path.read_text()
        assert "restored model version 1" in log  # vLLM's own loader: base, then a swap
        assert "swapped in after the engine loaded the base" in log
    finally:
        main.stop()

    # the recorded version cannot be restored: refuse to start rather than serve another
    (tmp_path / "state" / again["chain"][0]["file"]).unlink()
    broken = server(delta_chain, tmp_path, "broken", env, extra_env={"JLSERVE_INSECURE_ADMIN": "1"})
    assert broken.start().exit_code(STARTUP_TIMEOUT_S) != 0
    assert "delta of version 1 is missing" in broken.log_path.read_text()


def test_insecure_admin_is_refused_when_vllm_binds_every_interface(delta_chain, env, tmp_path):
    """jlserve's own defaults say nothing about the bind: vLLM's --host does."""
    exposed = server(
        delta_chain, tmp_path, "exposed", env, host="0.0.0.0",
        extra_env={"JLSERVE_INSECURE_ADMIN": "1"},
    )  # fmt: skip
    assert exposed.start().exit_code(STARTUP_TIMEOUT_S) != 0
    log = exposed.log_path.read_text()
    assert "--insecure-admin is only allowed on a loopback host, and vLLM binds '0.0.0.0'" in log


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("plugin_import:raise", "InjectedFault: injected fault at plugin_import"),
        # a typo in the test-only fault setting must never test nothing
        ("plugin_imprt:raise", f"ServeConfigError: {FAULT_ENV}: 'plugin_imprt:raise' is not"),
    ],
    ids=["import-fails", "malformed-fault-setting"],
)
def test_a_plugin_that_cannot_load_stops_the_server(delta_chain, env, tmp_path, spec, why):
    failing = server(
        delta_chain, tmp_path, "failing", env,
        extra_env={"JLSERVE_INSECURE_ADMIN": "1", FAULT_ENV: spec},
    )  # fmt: skip
    code, log = refused_start(failing)
    assert code != 0
    assert f"the jlserve endpoint plugin cannot load ({why}" in log
    assert "refusing to start" in log
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{failing.url}/health", timeout=2)


def test_a_missing_worker_extension_stops_the_server(delta_chain, env, tmp_path):
    """Without jlserve's worker extension no swap could reach the weights: vLLM's engine
    starts, and then the plugin refuses to let the server listen."""
    bare = server(
        delta_chain, tmp_path, "bare", env, worker_extension=None,
        extra_env={"JLSERVE_INSECURE_ADMIN": "1"},
    )  # fmt: skip
    code, log = refused_start(bare)
    assert code != 0
    assert f"jlserve needs vLLM's --worker-extension-cls {WORKER_EXTENSION} (got '')" in log
