"""jlserve/rollout.py without servers: what goes into the feed, and what does not."""

from __future__ import annotations

import pytest

from jlserve.errors import AdminRequestError, DeltaFormatError
from jlserve.rollout import (
    UNREACHABLE,
    FeedDelta,
    ReplicaProgress,
    RolloutReport,
    publish_to_feed,
    summary,
)


def test_a_delta_is_written_once_readable_by_all_and_never_replaced(tmp_path, delta_chain):
    feed = tmp_path / "feed"
    feed.mkdir()
    first, second = delta_chain.deltas[0], delta_chain.deltas[1]
    delta, written = publish_to_feed(first, feed)
    name = delta.name
    assert (name, delta.size, written) == (first.name, first.stat().st_size, True)
    assert delta.fingerprint.startswith("sha256:")
    assert (feed / name).read_bytes() == first.read_bytes()
    assert (feed / name).stat().st_mode & 0o777 == 0o644
    assert publish_to_feed(first, feed) == (delta, False)  # same bytes: nothing to do
    other = tmp_path / first.name
    other.write_bytes(second.read_bytes())
    with pytest.raises(AdminRequestError, match="exists with other contents"):
        publish_to_feed(other, feed)
    assert (feed / name).read_bytes() == first.read_bytes()
    assert sorted(p.name for p in feed.iterdir()) == [name]  # no temporary file left


@pytest.mark.parametrize("name", [".hidden.safetensors", "task.bin"])
def test_names_replicas_would_not_read_are_refused(tmp_path, delta_chain, name):
    feed = tmp_path / "feed"
    feed.mkdir()
    delta = tmp_path / name
    delta.write_bytes(delta_chain.deltas[0].read_bytes())
    with pytest.raises(AdminRequestError, match="replicas read only"):
        publish_to_feed(delta, feed)
    assert not any(feed.iterdir())


def test_a_malformed_delta_or_a_missing_feed_is_refused(tmp_path, delta_chain):
    feed = tmp_path / "feed"
    feed.mkdir()
    bad = tmp_path / "task9.safetensors"
    bad.write_bytes(delta_chain.deltas[0].read_bytes()[:100])
    with pytest.raises(DeltaFormatError, match=r"task9\.safetensors"):
        publish_to_feed(bad, feed)
    with pytest.raises(AdminRequestError, match="not a directory"):
        publish_to_feed(delta_chain.deltas[0], tmp_path / "nowhere")
    assert not any(feed.iterdir())


def test_the_summary_names_who_serves_who_refused_and_who_lags():
    fp = "sha256:" + "a" * 64
    report = RolloutReport(
        FeedDelta("task1.safetensors", fp, 100),
        [
            ReplicaProgress("http://a", version=1, fingerprint=fp, converged_s=0.5),
            ReplicaProgress("http://b", version=0, fingerprint="sha256:b", refused="too large"),
            ReplicaProgress("http://c", problem=UNREACHABLE, unanswered=3),
            ReplicaProgress("http://d", denied="server refused (401): bad token"),
        ],
        seconds=9.0,
    )
    lines = summary(report)
    assert lines[0] == "http://a: serves it since +0.5 s (version 1)"
    assert lines[1] == "http://b: REFUSED it: too large; serves version 0 (sha256:b)"
    assert lines[2] == "http://c: LAGS: serves unknown; unreachable; 3 polls unanswered"
    assert lines[3] == "http://d: CANNOT BE FOLLOWED: server refused (401): bad token"
    assert lines[4].startswith("rollout INCOMPLETE after 9.0 s: 3 of 4 replicas")
    assert report.disagreement_s is None and not report.converged
    moved = ReplicaProgress("b", converged_s=2.0, moved_on="applied as version 3; now serves 4")
    done = RolloutReport(FeedDelta("t", fp, 1), [ReplicaProgress("a", converged_s=0.5), moved])
    assert done.converged and done.disagreement_s == 1.5
    lines = summary(done)
    assert lines[1] == "b: took it (seen at +2.0 s): applied as version 3; now serves 4"
    assert lines[2].startswith(f"rollout done: all 2 replicas took (and 1 moved on from) {fp}")
