"""`jlserve update` across several replicas: per-replica results, no silent mixed versions."""

from __future__ import annotations

import httpx
import pytest

from jlserve.cli import main
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


def version(server: ServerProcess) -> int:
    return httpx.get(f"{server.url}/admin/status", headers=admin_headers()).json()["version"]


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

    # 1. Every replica takes the delta; each one is reported.
    code, out, _ = update(capsys, token_file, delta_chain.deltas[0], urls)
    assert code == 0
    assert all(f"{url}: version 0 -> 1" in out for url in urls)
    assert [version(s) for s in servers] == [1, 1]

    # 2. A dead replica at the end: the rollout stops, the updated ones are rolled back.
    dead = f"http://127.0.0.1:{free_port()}"
    urls_file = tmp_path / "replicas.txt"
    urls_file.write_text("\n".join([*urls, dead]) + "\n")
    code, out, err = update(
        capsys, token_file, delta_chain.deltas[1], [], "--urls-file", str(urls_file)
    )
    assert code == 2
    assert f"{dead}: FAILED" in err and "cannot reach the server" in err
    assert "no replica runs the new version" in err
    assert all(f"{url}: version 1 -> 2, " in out and "rolled back to 1" in out for url in urls)
    assert [version(s) for s in servers] == [1, 1]

    # 3. Without rollback, the mixed state is said out loud.
    code, _, err = update(
        capsys, token_file, delta_chain.deltas[1], [urls[0], dead], "--no-rollback-on-failure"
    )
    assert code == 2 and f"MIXED VERSIONS: {urls[0]} run the new version" in err
    assert [version(s) for s in servers] == [2, 1]
