"""`diagnose --local` holds the worker's per-report lock (issue 13, item 6, the CLI side).

The worker takes a Redis lock per report key from the look-up to the write, so overlapping runs
on a server whose conditional create is not atomic write one report; a CLI run in this process
did not take it, so a CLI run overlapping a worker task could write a second report. The fake
server is tests/unit/test_report_lock.py's non-atomic one; the state store a private redis-server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner

from clinragen_fhir import cli
from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.state import LOCK_KEY, WorkerState
from tests.fhir_batch import batching
from tests.unit.test_delivery_limit import free_port, private_redis
from tests.unit.test_report_lock import PID, NonAtomicServer


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture()
def local_run(redis_url: str, monkeypatch: pytest.MonkeyPatch
              ) -> Callable[..., tuple[NonAtomicServer, Any]]:
    """`clinragen-fhir diagnose --local PID` against one fake server and the private Redis."""
    redis.Redis.from_url(redis_url).flushdb()
    kg = load_graph(None)
    client = FhirEndpoint.client

    def run(state_url: str = redis_url) -> tuple[NonAtomicServer, Any]:
        settings = Settings(fhir={"base_url": "http://127.0.0.1:9/fhir", "retries": 1},
                            state_url=state_url,
                            worker={"soft_time_limit_s": 10, "time_limit_s": 20,
                                    "visibility_timeout_s": 60})
        server = NonAtomicServer(1)
        monkeypatch.setattr(cli, "_settings", lambda: settings)
        monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
        monkeypatch.setattr(FhirEndpoint, "client", lambda self, observer=None: client(
            self, transport=httpx.MockTransport(batching(server.handler)), observer=observer))
        result = CliRunner().invoke(cli.main, ["diagnose", "--local", PID])
        return server, result

    return run


def test_a_local_run_takes_and_releases_the_report_lock(
        local_run: Callable[..., tuple[NonAtomicServer, Any]], redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[tuple[str, str]] = []
    acquire = WorkerState.acquire_report

    def spy(self: WorkerState, key: str, owner: str, ttl_s: float, wait_s: float) -> bool:
        taken.append((key, owner))
        return acquire(self, key, owner, ttl_s, wait_s)

    monkeypatch.setattr(WorkerState, "acquire_report", spy)
    server, result = local_run()
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output)
    assert outcome["status"] == "written" and len(server.reports()) == 1
    [(key, owner)] = taken
    assert key == outcome["identifier"] and owner.startswith("cli-")
    assert not redis.Redis.from_url(redis_url).keys(f"{LOCK_KEY}*")  # released


def test_a_local_run_waits_for_a_report_another_run_is_writing(
        local_run: Callable[..., tuple[NonAtomicServer, Any]], redis_url: str) -> None:
    """A worker task holds the report's lock: the CLI run writes nothing and says why."""
    _, first = local_run()
    key = json.loads(first.output)["identifier"]  # the report key of these inputs
    redis.Redis.from_url(redis_url).flushdb()
    assert WorkerState(redis_url).acquire_report(key, "worker-task", 60, 0)
    server, result = local_run()
    assert result.exit_code == 1
    assert f"ReportLocked: another run is writing report {key[:12]}" in result.output
    assert server.reports() == []  # no second report beside the one the task is writing
    assert redis.Redis.from_url(redis_url).get(LOCK_KEY + key) == b"worker-task"


def test_a_local_run_with_the_state_store_down_still_writes(
        local_run: Callable[..., tuple[NonAtomicServer, Any]]) -> None:
    server, result = local_run(state_url=f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["status"] == "written"
    assert len(server.reports()) == 1
