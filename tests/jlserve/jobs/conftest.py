"""The jobs tests start `jlserve worker` processes; none outlives its test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.jobs import kill_leftover_workers


@pytest.fixture(autouse=True)
def _no_leftover_worker() -> Iterator[None]:
    yield
    kill_leftover_workers()
