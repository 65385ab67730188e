"""`jlserve update` across several replicas: per-replica results and fingerprints, no
silent mix of models."""

from __future__ import annotations

import httpx
import pytest

from jlserve.cli import main
from jlserve.delta import read_delta
from jlserve.local_server import free_port
from tests.helpers.serving import ADMIN_TOKEN, ServerProcess, admin_headers, start_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    flags = ("--admin-token-file", str(token_file))
    servers = [
        ServerProcess(delta_chain.base, root / f"state{i}", root / f"r{i}.log", flags)
        for i in range(2)
    ]
    start_all(servers)
    yield servers, token_file
    for server in servers:
        server.stop()


def fingerprint(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/admin/status", headers=admin_headers()).json()["fingerprint"]


def child(delta) -> str:
    return read_delta(delta).metadata.child_fingerprint


def update(capsys, token_file, delta, urls, *flags: str) -> tuple[int, str, str]:
    argv = ["update", "--delta", str(delta), "--admin-token-file", str(token_file), *flags]
    for url in urls:
        argv += ["--url", url]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_fleet_rollout(replicas, delta_chain, capsys, tmp_path):
    servers, token_file = replicas
    urls = [s.url for s in servers]

    # 1. Every replica takes the delta; each one is reported with the model it serves.
    v1, v2 = child(delta_chain.deltas[0]), child(delta_chain.deltas[1])
    code, out, _ = update(capsys, token_file, delta_chain.deltas[0], urls)
    assert code == 0
    assert all(f"{url}: version 0 -> 1" in out for url in urls)
    assert out.count(f"serves version 1 {v1}") == 2
    assert [fingerprint(s) for s in servers] == [v1, v1]
    # sending it again is idempotent on every replica
    code, out, _ = update(capsys, token_file, delta_chain.deltas[0], urls)
    assert code == 0 and out.count("already served (version 1)") == 2

    # 2. A dead replica at the end: the rollout stops, the updated ones are rolled back.
    dead = f"http://127.0.0.1:{free_port()}"
    urls_file = tmp_path / "replicas.txt"
    urls_file.write_text("\n".join([*urls, dead]) + "\n")
    code, out, err = update(
        capsys, token_file, delta_chain.deltas[1], [], "--urls-file", str(urls_file)
    )
    assert code == 2
    assert f"{dead}: FAILED" in err and "cannot reach the server" in err
    assert "no replica serves the new model" in err and f"{dead}: model unknown" in err
    assert all(f"{url}: version 1 -> 2, " in out for url in urls)
    assert out.count(f"rolled back to {v1}; serves version 1 {v1}") == 2
    assert [fingerprint(s) for s in servers] == [v1, v1]

    # 3. Without rollback, the mixed state is said out loud.
    code, _, err = update(
        capsys, token_file, delta_chain.deltas[1], [urls[0], dead], "--no-rollback-on-failure"
    )
    assert code == 2 and f"MIXED VERSIONS: {urls[0]} serve the new model {v2}" in err
    assert [fingerprint(s) for s in servers] == [v2, v1]
