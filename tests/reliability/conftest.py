"""Fixtures of the reliability suite: its own HAPI (8091) and Redis (6391), started and stopped
here so CI runs the suite unchanged. `RELIABILITY_FULL=1` (or `make reliability`) selects the
full form; the short form runs inside `make test`.

Every test here is marked `reliability`; those that need the services are also `integration`
(so `make test-unit` stays service-free).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.stack import (
    FULL,
    HAPI_PORT,
    LOGS,
    REDIS_PORT,
    RUN,
    Hapi,
    RabbitMQ,
    Redis,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def full() -> bool:
    return FULL


@pytest.fixture(scope="session")
def machine_lock() -> Iterator[None]:
    """One suite at a time per machine and port pair: the scenarios stop and flush the shared
    HAPI/Redis, so a second run (another checkout's `make test`, say) would break both.
    Measured: a CI checkout's short form shut down this Redis mid-scenario. Waits up to
    RELIABILITY_LOCK_WAIT_S (default 1800 s), then fails naming the lock."""
    path = Path(f"/tmp/clinragen-reliability-{HAPI_PORT}-{REDIS_PORT}.lock")
    wait_s = float(os.environ.get("RELIABILITY_LOCK_WAIT_S", "1800"))
    with open(path, "w") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another reliability run holds {path} for > {wait_s:.0f} s")
                time.sleep(2)
        fh.write(str(os.getpid()))
        fh.flush()
        # This session's logs only (test_9 greps them all): cleared once the lock is held.
        # Clearing them at session start, before the lock, let a second session (another
        # checkout's `make test`, waiting for the lock) delete a running full form's worker
        # logs, and that run's log grep then found 44 lines instead of thousands.
        for old in LOGS.glob("*.log"):
            old.unlink()
        yield
        fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def hapi(machine_lock: None) -> Iterator[Hapi]:
    """HAPI on 127.0.0.1:8091 with its data in .run/hapi-reliability (reused if it answers)."""
    server = Hapi()
    started_here = not server.up()
    if started_here:
        server.start()
    yield server
    if started_here and not os.environ.get("RELIABILITY_KEEP"):
        server.stop()


@pytest.fixture(scope="session")
def redis_server(machine_lock: None) -> Iterator[Redis]:
    """redis-server on 127.0.0.1:6391, appendonly yes / appendfsync everysec."""
    server = Redis()
    started_here = not server.ping()
    server.start()
    yield server
    if started_here and not os.environ.get("RELIABILITY_KEEP"):
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq(machine_lock: None) -> Iterator[RabbitMQ]:
    """A private RabbitMQ node on 127.0.0.1:5673 (the shared one on 5672 is left alone),
    started here and stopped after the session (with its EPMD) unless RELIABILITY_KEEP=1."""
    node = RabbitMQ()
    node.start()
    yield node
    if not os.environ.get("RELIABILITY_KEEP"):
        node.shutdown()


@pytest.fixture()
def clean_redis(redis_server: Redis) -> Redis:
    """Empty queue, results and dead-letter queue for each scenario."""
    redis_server.flush()
    return redis_server


@pytest.fixture(scope="session", autouse=True)
def _run_dirs() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
