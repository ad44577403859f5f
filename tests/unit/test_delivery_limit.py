"""A task whose worker dies on every delivery ends in the dead-letter queue (issue 13, item 2).

`task_reject_on_worker_lost` hands the task of a worker that died back to the queue, with no
limit: a record that runs a worker out of memory was redelivered forever. Deliveries are now
counted in the state store (a private redis-server here), and past `max_deliveries` the task is
dead-lettered with the reason instead of run again. A death is simulated in process: SystemExit
leaves Celery's tracer as an OOM kill leaves the pool child, with nothing after the task run
(tests/integration/test_poison_task.py SIGKILLs a real worker's child instead).
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.errors import FhirUnavailable
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import Outcome
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.state import DELIVERIES_KEY, WorkerState

PID = "p-poison-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    """A private, memory-only redis-server on a free port (tests/unit/test_report_lock.py and
    tests/integration/test_poison_task.py use it too)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("redis-server did not start (is it installed?)")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture()
def worker(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """The `diagnose` task wired to the private Redis; the pipeline replaced by `body`."""
    redis.Redis.from_url(redis_url).flushdb()
    kg = load_graph(None)

    def setup(body: Callable[..., Outcome], **worker: Any) -> Settings:
        settings = Settings(state_url=redis_url,
                            worker={"max_retries": 2, "retry_backoff_s": 0.01, **worker})
        monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
        monkeypatch.setattr(tasks, "diagnose_patient", body)
        monkeypatch.setattr(settings.fhir.__class__, "client", lambda self, observer=None:
                            httpx.Client())  # a context manager the body never uses
        return settings

    return setup


def killed(*_: Any, **__: Any) -> Outcome:
    raise SystemExit("the pool child died (SIGKILL by the OOM killer)")


def test_a_task_that_dies_on_every_delivery_is_dead_lettered_with_the_reason(
        worker: Callable[..., Settings], redis_url: str) -> None:
    runs: list[int] = []

    def dies(*args: Any, **kwargs: Any) -> Outcome:
        runs.append(1)
        return killed()

    settings = worker(dies, max_deliveries=3)
    task_id = uuid.uuid4().hex
    for _ in range(3):  # the broker redelivers the same message (same id, same retry number)
        with pytest.raises(SystemExit):
            tasks.diagnose.apply((PID,), task_id=task_id)
    result = tasks.diagnose.apply((PID,), task_id=task_id)  # the fourth delivery
    assert result.failed() and isinstance(result.result, tasks.DeliveryLimitExceeded)
    assert len(runs) == 3  # not run a fourth time
    [letter] = WorkerState(settings.state_url).dead_letters()
    assert letter.task == "clinragen.diagnose" and letter.args == [PID]
    assert letter.error == (
        "DeliveryLimitExceeded: delivered 4 times without finishing (max_deliveries = 3): its "
        "worker died on every run (out of memory, or killed); dead-lettered, not run again")
    assert not redis.Redis.from_url(redis_url).keys(f"{DELIVERIES_KEY}*")  # count dropped


def test_a_normal_task_is_unaffected_and_leaves_no_count(
        worker: Callable[..., Settings], redis_url: str) -> None:
    settings = worker(lambda *a, **k: Outcome("h", "written", report_id="r1"), max_deliveries=1)
    for _ in range(3):  # the same message id run again (a lost ack): each run finished
        result = tasks.diagnose.apply((PID,), task_id="same-id")
        assert result.successful() and result.result["report_id"] == "r1"
    assert WorkerState(settings.state_url).dead_letters() == []
    assert not redis.Redis.from_url(redis_url).keys(f"{DELIVERIES_KEY}*")


def test_retries_are_new_messages_not_redeliveries(worker: Callable[..., Settings]) -> None:
    """A retried task (a server blip) is a new message each time: with max_deliveries = 1 it
    still runs all its retries."""
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Outcome:
        calls.append(1)
        if len(calls) < 3:
            raise FhirUnavailable("GET Patient/#abc: ConnectError")
        return Outcome("h", "written", report_id="r2")

    settings = worker(flaky, max_deliveries=1)
    result = tasks.diagnose.apply((PID,))
    assert result.successful() and len(calls) == 3
    assert WorkerState(settings.state_url).dead_letters() == []


def test_a_task_that_died_once_runs_again(worker: Callable[..., Settings]) -> None:
    outcomes: Iterator[Callable[..., Outcome]] = iter(
        [killed, lambda *a, **k: Outcome("h", "written", report_id="r3")])
    settings = worker(lambda *a, **k: next(outcomes)(*a, **k), max_deliveries=2)
    with pytest.raises(SystemExit):
        tasks.diagnose.apply((PID,), task_id="t-once")
    assert tasks.diagnose.apply((PID,), task_id="t-once").successful()
    assert WorkerState(settings.state_url).dead_letters() == []


def test_the_state_store_down_runs_the_task_uncounted(
        worker: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is lost for want of a counter: with Redis unreachable the task runs, as before."""
    settings = worker(lambda *a, **k: Outcome("h", "written", report_id="r4"), max_deliveries=1)
    down = settings.model_copy(update={"state_url": f"redis://127.0.0.1:{free_port()}/0"})
    kg = load_graph(None)
    monkeypatch.setattr(tasks, "load_runtime", lambda: (down, kg, RuleBaseline(kg)))
    result = tasks.diagnose.apply((PID,))
    assert result.successful() and result.result["report_id"] == "r4"


def test_counts_expire_after_the_longest_gap_between_deliveries() -> None:
    short = Settings(worker={"soft_time_limit_s": 10, "time_limit_s": 20,
                             "visibility_timeout_s": 60})
    assert tasks._delivery_ttl_s(short) == 24 * 3600
    long = Settings(worker={"visibility_timeout_s": 86400})
    assert tasks._delivery_ttl_s(long) == 2 * 86400  # a whole worker lost: back after that
