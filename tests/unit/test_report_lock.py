"""Concurrent writers of one report (issue 13, item 6): a lock per report key, in Redis.

Idempotency rested on the server making conditional create atomic; HAPI does, some servers do
not (microsoft/fhir-server#1382), and backfill, webhook and CLI runs for one patient can overlap.
The fake server here is such a server: its conditional create checks, sleeps, then creates, so
two concurrent `diagnose` tasks (threads) both write a report unless the lock serialises them.
The state store is a private redis-server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx
import pytest
import redis
from celery.signals import task_retry

from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.state import LOCK_KEY, ReportLocked, WorkerState
from tests.fake_fhir import StoreServer
from tests.fhir_batch import batching
from tests.unit.test_delivery_limit import free_port, private_redis

PID = "p-race-1"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


class NonAtomicServer(StoreServer):
    """A FHIR server whose conditional create is check-then-create with a pause between, the
    race of a server without a unique index on the identifier. Every patient request waits
    (bounded) until both runs have started, so the two runs overlap for certain."""

    def __init__(self, runs: int = 2) -> None:
        super().__init__(PID)
        self.started = threading.Barrier(runs, timeout=5)

    def reports(self) -> list[dict[str, Any]]:
        return self.of_type("DiagnosticReport")

    def before_write(self, rtype: str) -> None:
        if rtype == "DiagnosticReport":
            time.sleep(0.3)  # checked, not yet created: the window a second run falls into

    def on_patient(self) -> None:
        with suppress(threading.BrokenBarrierError):  # a single run: nothing to wait for
            self.started.wait()


class OneAtATime:
    """The rule baseline, one call at a time: rdflib's SPARQL parser is not thread-safe, and a
    worker runs one task per process anyway (the threads here share one process)."""

    def __init__(self, inner: RuleBaseline) -> None:
        self.inner, self.name, self.guard = inner, inner.name, threading.Lock()

    def predict(self, *args: Any) -> Any:
        with self.guard:
            return self.inner.predict(*args)


@pytest.fixture()
def run_tasks(redis_url: str, monkeypatch: pytest.MonkeyPatch
              ) -> Callable[..., tuple[NonAtomicServer, list[Any]]]:
    """Run `diagnose` for PID `n` times at once (threads, eagerly), against one fake server."""
    redis.Redis.from_url(redis_url).flushdb()
    kg = load_graph(None)
    client = FhirEndpoint.client

    def run(n: int = 2, state_url: str = redis_url, **worker: Any
            ) -> tuple[NonAtomicServer, list[Any]]:
        settings = Settings(fhir={"base_url": "http://127.0.0.1:9/fhir", "retries": 1},
                            state_url=state_url,
                            worker={"retry_backoff_s": 0.01, "max_retries": 3, **worker})
        server = NonAtomicServer(n)
        predictor = OneAtATime(RuleBaseline(kg))
        monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, predictor))
        monkeypatch.setattr(FhirEndpoint, "client", lambda self, observer=None: client(
            self, transport=httpx.MockTransport(batching(server.handler)), observer=observer))
        results: list[Any] = [None] * n

        def one(i: int) -> None:
            results[i] = tasks.diagnose.apply((PID,))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return server, results

    return run


def test_two_concurrent_tasks_for_one_patient_write_one_report(
        run_tasks: Callable[..., tuple[NonAtomicServer, list[Any]]], redis_url: str) -> None:
    server, results = run_tasks()
    assert all(r.successful() for r in results), [r.traceback for r in results]
    assert sorted(r.result["status"] for r in results) == ["exists", "written"]
    assert len(server.reports()) == 1
    assert not redis.Redis.from_url(redis_url).keys(f"{LOCK_KEY}*")  # released


def test_without_the_lock_the_fake_server_duplicates(
        run_tasks: Callable[..., tuple[NonAtomicServer, list[Any]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same two runs with the lock taken away write two reports, so the test
    above passes because of the lock, not because of the timing."""

    @contextmanager
    def no_lock(*args: Any) -> Iterator[None]:
        yield

    monkeypatch.setattr(tasks, "report_lock", no_lock)
    server, results = run_tasks()
    assert all(r.successful() for r in results)
    assert [r.result["status"] for r in results] == ["written", "written"]
    assert len(server.reports()) == 2


def test_a_lock_held_elsewhere_makes_the_task_retry_not_fail(
        run_tasks: Callable[..., tuple[NonAtomicServer, list[Any]]], redis_url: str) -> None:
    """Another run (a CLI, another worker) holds the report's lock: the task waits a little,
    then retries later; once the lock is free it writes the one report."""
    _, [first] = run_tasks(1)
    key = first.result["identifier"]  # the report key of these inputs (deterministic)
    redis.Redis.from_url(redis_url).flushdb()
    state = WorkerState(redis_url)
    assert state.acquire_report(key, "another-run", 60, 0)
    reasons: list[str] = []

    def on_retry(reason: Any = None, **_: Any) -> None:
        exc = reason.exc  # Celery's Retry, wrapping the task's own error
        reasons.append(f"{type(exc).__name__}: {exc}")
        state.release_report(key, "another-run")  # the other run finishes meanwhile

    task_retry.connect(on_retry, weak=False)
    try:  # soft limit 10 s: the task waits a tenth of it (1 s) before it retries
        server, [result] = run_tasks(1, soft_time_limit_s=10, time_limit_s=20,
                                     visibility_timeout_s=60)
    finally:
        task_retry.disconnect(on_retry)
    assert reasons == [f"ReportLocked: another run is writing report {key[:12]}; retry later"]
    assert result.successful() and result.result["status"] == "written"
    assert len(server.reports()) == 1
    assert WorkerState(redis_url).dead_letters() == []


def test_the_state_store_down_still_writes_the_report(
        run_tasks: Callable[..., tuple[NonAtomicServer, list[Any]]]) -> None:
    """No lock to be had: written unlocked (as before the lock) rather than lost."""
    server, [result] = run_tasks(1, state_url=f"redis://127.0.0.1:{free_port()}/0")
    assert result.successful() and result.result["status"] == "written"
    assert len(server.reports()) == 1


def test_the_lock_is_owned_expires_and_is_taken_back_by_its_owner(redis_url: str) -> None:
    state, r = WorkerState(redis_url), redis.Redis.from_url(redis_url)
    key = uuid.uuid4().hex
    assert state.acquire_report(key, "task-a", 30, 0)
    assert 0 < r.pttl(LOCK_KEY + key) <= 30_000  # a TTL: a dead holder does not block forever
    t0 = time.monotonic()
    assert not state.acquire_report(key, "task-b", 30, 0.2)  # waits, then gives up
    assert time.monotonic() - t0 >= 0.2
    assert state.acquire_report(key, "task-a", 30, 0)  # redelivered after its worker died
    assert not state.release_report(key, "task-b")  # not its lock: left alone
    assert r.get(LOCK_KEY + key) == b"task-a"
    assert state.release_report(key, "task-a") and r.get(LOCK_KEY + key) is None
    assert state.acquire_report(key, "task-b", 0.05, 0)  # expired locks are free again
    time.sleep(0.1)
    assert state.acquire_report(key, "task-c", 30, 0)
    assert not state.release_report(key, "task-b")  # it outlived its TTL: task-c's lock stays
    assert r.get(LOCK_KEY + key) == b"task-c"


def test_report_locked_is_what_a_busy_lock_raises(redis_url: str) -> None:
    state = WorkerState(redis_url)
    settings = Settings(worker={"soft_time_limit_s": 1, "time_limit_s": 2,
                                "visibility_timeout_s": 3})
    assert state.acquire_report("k1", "other", 30, 0)
    with pytest.raises(ReportLocked, match="another run is writing report k1"), \
            tasks.report_lock(state, "me", settings, "h", "k1"):
        pytest.fail("entered a lock another run holds")
    with tasks.report_lock(state, "other", settings, "h", "k1"):  # its own: re-entered
        pass
    assert not redis.Redis.from_url(redis_url).exists(LOCK_KEY + "k1")
