"""Fixtures of the reliability suite: its own HAPI (8091) and Redis (6391), started and stopped
here so CI runs the suite unchanged. `RELIABILITY_FULL=1` (or `make reliability`) selects the
full form; the short form runs inside `make test`.

Every test here is marked `reliability`; those that need the services are also `integration`
(so `make test-unit` stays service-free).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.stack import FULL, LOGS, RUN, Hapi, Redis


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def full() -> bool:
    return FULL


@pytest.fixture(scope="session")
def hapi() -> Iterator[Hapi]:
    """HAPI on 127.0.0.1:8091 with its data in .run/hapi-reliability (reused if it answers)."""
    server = Hapi()
    started_here = not server.up()
    if started_here:
        server.start()
    yield server
    if started_here and not os.environ.get("RELIABILITY_KEEP"):
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    """redis-server on 127.0.0.1:6391, appendonly yes / appendfsync everysec."""
    server = Redis()
    started_here = not server.ping()
    server.start()
    yield server
    if started_here and not os.environ.get("RELIABILITY_KEEP"):
        server.stop()


@pytest.fixture()
def clean_redis(redis_server: Redis) -> Redis:
    """Empty queue, results and dead-letter queue for each scenario."""
    redis_server.flush()
    return redis_server


@pytest.fixture(scope="session", autouse=True)
def _run_dirs() -> None:
    """This session's logs only (test_9 greps them all)."""
    RUN.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.glob("*.log"):
        old.unlink()
