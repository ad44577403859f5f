"""The one retry policy (clinragen_fhir/retry.py, issue 15 item 4): its waits, and the attempts
each layer makes, counted at an httpx.MockTransport: the FHIR client (one request), the Celery
task (one patient: the two layers together), the teacher's LLM client (one completion).

The bound per failing call is (fhir.retries + 1) x (worker.max_retries + 1) requests for a
transient error, one for a final one (docs/integration.md, "Retry policy").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirHTTPError, FhirUnavailable, is_retryable
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.retry import RetryPolicy
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.state import ReportLocked
from tests.fhir_batch import is_batch
from tests.unit.test_log_grep import FakeState
from training.llm import LLMClient, LLMConfig, LLMError

BASE = "http://127.0.0.1:8080/fhir"
PID = "p-retry-1"

Handler = Callable[[httpx.Request], httpx.Response]


class Counting:
    """A MockTransport handler that answers `answer(n)` to the n-th request and counts them."""

    def __init__(self, answer: Callable[[int, httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(len(self.requests), request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def always(status: int, headers: dict[str, str] | None = None) -> Counting:
    return Counting(lambda n, r: httpx.Response(status, headers=headers, text="no"))


@pytest.fixture()
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every in-process wait, not slept."""
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    return slept


# -- the policy ------------------------------------------------------------------------------

def test_waits_double_with_jitter_capped_and_retry_after_is_a_floor() -> None:
    p = RetryPolicy(attempts=6, backoff_s=5, max_backoff_s=300)
    mid = 0.5  # rng 0.5: the jitter factor is 1.0
    assert [p.delay(n, rng=lambda: mid) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160,
                                                                   300, 300]
    assert p.delay(1, rng=lambda: 0.0) == 2.5 and p.delay(1, rng=lambda: 0.999) < 7.5
    assert p.delay(1, retry_after=42, rng=lambda: mid) == 42  # the server's wait, not ours
    assert p.delay(1, retry_after=9000, rng=lambda: mid) == 300  # capped all the same


def test_next_wait_gives_up_when_attempts_are_spent_or_the_error_is_final() -> None:
    p = RetryPolicy(attempts=3, backoff_s=1, max_backoff_s=10, retry_on=is_retryable)
    blip = FhirUnavailable("GET Patient/#x: ConnectError")
    assert p.next_wait(1, blip) is not None and p.next_wait(2, blip) is not None
    assert p.next_wait(3, blip) is None  # three tries made: the third was the last
    assert p.next_wait(1, FhirHTTPError(404, "GET", "Patient/#x", "gone")) is None
    assert p.next_wait(1, ValueError("not ours")) is None


def test_a_long_retry_after_is_deferred_by_the_lower_layer_only() -> None:
    asks_two_minutes = FhirHTTPError(503, "GET", "Patient/#x", "busy", retry_after=120)
    client = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=30, retry_on=is_retryable,
                         defer_long_waits=True)
    task = RetryPolicy(attempts=6, backoff_s=5, max_backoff_s=300, retry_on=is_retryable)
    assert client.next_wait(1, asks_two_minutes) is None  # not slept in the worker: up it goes
    assert task.next_wait(1, asks_two_minutes) == 120  # the task's countdown honours it


def test_call_retries_what_retry_on_accepts_and_reraises_the_last_error(
        waits: list[float]) -> None:
    tries: list[int] = []
    seen: list[tuple[int, str]] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise FhirUnavailable(f"try {len(tries)}")
        return "ok"

    p = RetryPolicy(attempts=3, backoff_s=1, max_backoff_s=10, retry_on=is_retryable)
    assert p.call(flaky, on_retry=lambda n, e, w: seen.append((n, str(e)))) == "ok"
    assert len(tries) == 3 and seen == [(1, "try 1"), (2, "try 2")] and len(waits) == 2
    tries.clear()

    def down() -> str:
        tries.append(1)
        raise FhirUnavailable(f"try {len(tries)}")

    with pytest.raises(FhirUnavailable, match="try 3"):
        p.call(down)
    assert len(tries) == 3
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0, backoff_s=1, max_backoff_s=1)


# -- the FHIR client: one request --------------------------------------------------------------

@pytest.mark.parametrize("retries", [0, 1, 3])
def test_client_sends_a_transient_failure_retries_plus_one_times(
        retries: int, waits: list[float]) -> None:
    server = always(503)
    with FhirClient(BASE, transport=server.transport, retries=retries) as client, \
            pytest.raises(FhirHTTPError) as info:
        client.read("Patient", "p")
    assert len(server.requests) == retries + 1 and info.value.retryable
    assert len(waits) == retries


def test_client_retries_no_answer_and_sends_a_final_error_once(waits: list[float]) -> None:
    def refused(n: int, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    server = Counting(refused)
    with FhirClient(BASE, transport=server.transport, retries=2) as client, \
            pytest.raises(FhirUnavailable):
        client.capabilities()
    assert len(server.requests) == 3
    for status in (400, 401, 403, 404, 422):
        final = always(status)
        with FhirClient(BASE, transport=final.transport, retries=3) as client, \
                pytest.raises(FhirHTTPError):
            client.read("Patient", "p")
        assert len(final.requests) == 1, status


def test_client_waits_as_the_server_asks_and_leaves_long_waits_to_the_task(
        waits: list[float]) -> None:
    server = Counting(lambda n, r: httpx.Response(429, headers={"Retry-After": "7"}) if n == 1
                      else httpx.Response(200, json={"resourceType": "Patient", "id": "p"}))
    with FhirClient(BASE, transport=server.transport, retries=3) as client:
        assert client.read("Patient", "p")["id"] == "p"
    assert len(server.requests) == 2 and waits == [7.0]
    waits.clear()
    slow = always(503, {"Retry-After": "120"})  # over max_backoff (30 s): not slept here
    with FhirClient(BASE, transport=slow.transport, retries=3) as client, \
            pytest.raises(FhirHTTPError) as info:
        client.read("Patient", "p")
    assert len(slow.requests) == 1 and waits == [] and info.value.retry_after == 120


def test_endpoint_settings_reach_the_clients_policy() -> None:
    endpoint = FhirEndpoint(base_url=BASE, retries=1, retry_backoff_s=0.25,
                            retry_backoff_max_s=4)
    with endpoint.client() as client:
        policy = client.policy()
    assert (policy.attempts, policy.backoff_s, policy.max_backoff_s) == (2, 0.25, 4)
    assert policy.defer_long_waits


# -- the task: one patient, both layers ------------------------------------------------------

@pytest.fixture()
def run_task(monkeypatch: pytest.MonkeyPatch, waits: list[float]
             ) -> Callable[..., tuple[Any, FakeState]]:
    """`diagnose` run eagerly (its retries too) against a MockTransport FHIR server."""
    kg = load_graph(None)

    def run(server: Counting, *, fhir_retries: int, max_retries: int) -> tuple[Any, FakeState]:
        settings = Settings(fhir={"base_url": BASE, "retries": fhir_retries},
                            worker={"max_retries": max_retries, "retry_backoff_s": 0.01})
        state = FakeState()
        monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
        monkeypatch.setattr(tasks, "WorkerState", lambda url: state)
        client = FhirEndpoint.client
        monkeypatch.setattr(FhirEndpoint, "client", lambda self, transport=None, observer=None:
                            client(self, transport=server.transport, observer=observer))
        return tasks.diagnose.apply((PID,)), state

    return run


@pytest.mark.parametrize(("fhir_retries", "max_retries"), [(3, 5), (0, 5), (2, 0), (1, 2)])
def test_a_failing_call_is_sent_at_most_client_times_task_attempts(
        run_task: Callable[..., tuple[Any, FakeState]], fhir_retries: int, max_retries: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """The documented bound, reached exactly by a server that answers 503 to everything. With
    max_retries = 5 the task runs six times: Celery's own default (max_retries 3) used to end
    it after four runs, whatever worker.max_retries said."""
    server = always(503)
    with caplog.at_level(logging.WARNING):
        result, state = run_task(server, fhir_retries=fhir_retries, max_retries=max_retries)
    assert result.failed() and "HTTP 503" in str(result.result)
    # the failing call: the batch of reads, the Patient first (each run also tries to record
    # its failure: a transaction)
    reads = [r for r in server.requests if is_batch(r)]
    assert len(reads) == (fhir_retries + 1) * (max_retries + 1)
    assert {json.loads(r.content)["entry"][0]["request"]["url"] for r in reads} == {
        f"Patient/{PID}"}
    task_retries = [r for r in caplog.records if r.getMessage() == "diagnose retry"]
    assert len(task_retries) == max_retries
    assert len(state.letters) == 1  # dead-lettered once, after the last run


def test_a_final_error_is_sent_once_and_dead_lettered(
        run_task: Callable[..., tuple[Any, FakeState]]) -> None:
    server = always(404)
    result, state = run_task(server, fhir_retries=3, max_retries=5)
    assert result.failed() and len([r for r in server.requests if is_batch(r)]) == 1
    assert "HTTP 404" in state.letters[0][1]


def test_the_task_retries_a_long_retry_after_the_client_left_to_it(
        run_task: Callable[..., tuple[Any, FakeState]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 asking for 120 s: the client does not sleep on it (one request per run); the
    task's countdown is the server's 120 s."""
    countdowns: list[float] = []
    retry = tasks.diagnose.retry

    def spy(*args: Any, **kwargs: Any) -> Any:
        countdowns.append(kwargs["countdown"])
        return retry(*args, **kwargs)

    monkeypatch.setattr(tasks.diagnose, "retry", spy)
    server = always(503, {"Retry-After": "120"})
    result, _ = run_task(server, fhir_retries=3, max_retries=2)
    reads = [r for r in server.requests if is_batch(r)]
    assert result.failed() and len(reads) == 3  # 1 per run, 3 runs
    assert countdowns == [120, 120]


def test_report_locked_is_retried_by_the_task_layer() -> None:
    policy = tasks.retry_policy(Settings().worker)
    assert policy.attempts == 6 and policy.next_wait(1, ReportLocked("held")) is not None
    assert policy.next_wait(6, ReportLocked("held")) is None


# -- the teacher's LLM client: one completion ------------------------------------------------

def llm(server: Counting, retries: int) -> LLMClient:
    return LLMClient(LLMConfig(base_url="http://127.0.0.1:8000/v1", model="m", retries=retries,
                               rate_per_s=0, api_key_env=None), transport=server.transport)


@pytest.mark.parametrize("retries", [0, 2, 4])
def test_llm_sends_a_transient_failure_retries_plus_one_times(
        retries: int, waits: list[float]) -> None:
    server = always(503)
    with llm(server, retries) as client, pytest.raises(LLMError,
                                                       match=f"after {retries + 1} tries"):
        client.complete([{"role": "user", "content": "q"}])
    assert len(server.requests) == retries + 1
    assert client.stats.retries == retries and client.stats.requests == retries + 1


def test_llm_sends_a_final_error_once_and_retries_a_timeout(waits: list[float]) -> None:
    server = always(400)
    with llm(server, 4) as client, pytest.raises(LLMError, match="HTTP 400"):
        client.complete([{"role": "user", "content": "q"}])
    assert len(server.requests) == 1

    def timeout_then_ok(n: int, request: httpx.Request) -> httpx.Response:
        if n == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "fine"}}]})

    server = Counting(timeout_then_ok)
    with llm(server, 4) as client:
        assert client.complete([{"role": "user", "content": "q"}]).text == "fine"
    assert len(server.requests) == 2 and len(waits) == 1
