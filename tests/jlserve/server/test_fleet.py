"""`jlserve update` across several replicas: per-replica results and fingerprints, no
silent mix of models; `jlserve rollout` through the feed folder every replica watches."""

from __future__ import annotations

import httpx
import pytest

from jlserve.checkpoint import load_tensors
from jlserve.cli import main
from jlserve.delta import read_delta
from jlserve.local_server import free_port
from tests.helpers.bad_deltas import good_delta, model_errors
from tests.helpers.serving import (
    ADMIN_TOKEN,
    ServerProcess,
    admin_headers,
    admin_status,
    start_all,
    until,
    watch_outcome,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(delta_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    token_file = root / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    feed = root / "feed"  # the folder every replica watches
    feed.mkdir()
    flags = ("--admin-token-file", str(token_file), "--watch", str(feed))
    servers = [
        ServerProcess(delta_chain.base, root / f"state{i}", root / f"r{i}.log", flags)
        for i in range(2)
    ]
    start_all(servers)
    yield servers, token_file, feed
    for server in servers:
        server.stop()


def fingerprint(server: ServerProcess) -> str:
    return admin_status(server)["fingerprint"]


def child(delta) -> str:
    return read_delta(delta).metadata.child_fingerprint


def run_cli(
    capsys, token_file, delta, urls, *flags: str, command: str = "update"
) -> tuple[int, str, str]:
    argv = [command, "--delta", str(delta), "--admin-token-file", str(token_file), *flags]
    for url in urls:
        argv += ["--url", url]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_fleet_rollout(replicas, delta_chain, capsys, tmp_path):
    servers, token_file, _ = replicas
    urls = [s.url for s in servers]

    # 1. Every replica takes the delta; each one is reported with the model it serves.
    v1, v2 = child(delta_chain.deltas[0]), child(delta_chain.deltas[1])
    code, out, _ = run_cli(capsys, token_file, delta_chain.deltas[0], urls)
    assert code == 0
    assert all(f"{url}: version 0 -> 1" in out for url in urls)
    assert out.count(f"serves version 1 {v1}") == 2
    assert [fingerprint(s) for s in servers] == [v1, v1]
    # sending it again is idempotent on every replica
    code, out, _ = run_cli(capsys, token_file, delta_chain.deltas[0], urls)
    assert code == 0 and out.count("already served (version 1)") == 2

    # 2. A dead replica at the end: the rollout stops, the updated ones are rolled back.
    dead = f"http://127.0.0.1:{free_port()}"
    urls_file = tmp_path / "replicas.txt"
    urls_file.write_text("\n".join([*urls, dead]) + "\n")
    code, out, err = run_cli(
        capsys, token_file, delta_chain.deltas[1], [], "--urls-file", str(urls_file)
    )
    assert code == 2
    assert f"{dead}: FAILED" in err and "cannot reach the server" in err
    assert "no replica serves the new model" in err and f"{dead}: model unknown" in err
    assert all(f"{url}: version 1 -> 2, " in out for url in urls)
    assert out.count(f"rolled back to {v1}; serves version 1 {v1}") == 2
    assert [fingerprint(s) for s in servers] == [v1, v1]

    # 3. Without rollback, the mixed state is said out loud.
    code, _, err = run_cli(
        capsys, token_file, delta_chain.deltas[1], [urls[0], dead], "--no-rollback-on-failure"
    )
    assert code == 2 and f"MIXED VERSIONS: {urls[0]} serve the new model {v2}" in err
    assert [fingerprint(s) for s in servers] == [v2, v1]


def test_rollout_through_the_feed_follows_every_replica_and_names_refusals(
    replicas, delta_chain, capsys, tmp_path
):
    servers, token_file, feed = replicas
    urls = [s.url for s in servers]
    v1, v2 = child(delta_chain.deltas[0]), child(delta_chain.deltas[1])
    # the previous test left [v2, v1]: the first replica goes back to v1
    r = httpx.post(
        f"{urls[0]}/admin/rollback", json={"to_version": 1}, headers=admin_headers(), timeout=120
    )
    assert r.status_code == 200, r.text
    assert [fingerprint(s) for s in servers] == [v1, v1]

    # 1. Written into the feed, taken by each replica on its own, followed to the end.
    code, out, err = run_cli(
        capsys, token_file, delta_chain.deltas[1], urls, "--feed", str(feed), command="rollout"
    )
    assert code == 0, out + err
    assert (feed / "task2.safetensors").read_bytes() == delta_chain.deltas[1].read_bytes()
    assert (feed / "task2.safetensors").stat().st_mode & 0o777 == 0o644  # replicas' user reads it
    assert f"rollout done: all 2 replicas serve {v2}" in out and "they disagreed for" in out
    assert all(f"{url}: serves it since +" in out for url in urls)
    assert [fingerprint(s) for s in servers] == [v2, v2]
    until(lambda: watch_outcome(admin_status(servers[0]), "task2.safetensors") == "applied", 60)
    # again: already in the feed, already served
    code, out, err = run_cli(
        capsys, token_file, delta_chain.deltas[1], urls, "--feed", str(feed), command="rollout"
    )
    assert code == 0 and "already in" in err

    # 2. A later delta through the feed; following the earlier one then finds every replica
    # took it and moved on (its watch record), not lagging.
    v3 = child(delta_chain.deltas[2])
    code, out, _ = run_cli(
        capsys, token_file, delta_chain.deltas[2], urls, "--feed", str(feed), command="rollout"
    )
    assert code == 0 and f"rollout done: all 2 replicas serve {v3}" in out
    code, out, _ = run_cli(capsys, token_file, delta_chain.deltas[1], urls, command="rollout")
    assert code == 0, out
    assert f"rollout done: all 2 replicas took (and 2 moved on from) {v2}" in out
    assert all(f"{url}: took it (seen at +" in out for url in urls)

    # 3. A replica that never answers lags, and the rollout says so when its time is up;
    # a replica that refuses our token cannot be followed, and says so at once.
    wrong_token = tmp_path / "wrong.token"
    wrong_token.write_text("not-the-token")
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, _ = run_cli(
        capsys, token_file, delta_chain.deltas[1], [*urls, dead], "--timeout", "2",
        command="rollout",
    )  # fmt: skip
    assert code == 1
    assert f"{dead}: LAGS: serves unknown; unreachable" in out
    assert "rollout INCOMPLETE after" in out and f"({dead})" in out
    argv = ["rollout", "--delta", str(delta_chain.deltas[2]), "--url", urls[0]]
    assert main([*argv, "--admin-token-file", str(wrong_token), "--timeout", "60"]) == 1
    assert f"{urls[0]}: CANNOT BE FOLLOWED: server refused (403)" in capsys.readouterr().out

    # 4. A well-formed delta that does not fit the served model: every replica refuses it
    # (its watch record says why) and keeps serving v3.
    bad = model_errors(good_delta(load_tensors(delta_chain.merged[3])))
    (case,) = [c for c in bad if c.name == "old-values-differ"]
    bad_file = tmp_path / "task3-bad.safetensors"
    bad_file.write_bytes(case.data)
    code, out, _ = run_cli(
        capsys, token_file, bad_file, urls, "--feed", str(feed), command="rollout"
    )
    assert code == 1, out
    assert out.count("REFUSED it: ") == 2 and out.count(case.message) == 2
    assert [fingerprint(s) for s in servers] == [v3, v3]

    # 5. A malformed file never reaches the feed.
    corrupt = tmp_path / "task4.safetensors"
    corrupt.write_bytes(delta_chain.deltas[2].read_bytes()[:-10])
    before = sorted(p.name for p in feed.iterdir())
    code, _, err = run_cli(
        capsys, token_file, corrupt, urls, "--feed", str(feed), command="rollout"
    )
    assert code == 2 and "task4.safetensors" in err
    assert sorted(p.name for p in feed.iterdir()) == before
