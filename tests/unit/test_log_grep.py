"""Log grep at the unit level (issue 13, item 3): the `diagnose` task, run eagerly against fake
transports, never writes a bearer token or a patient id into a log line, a Celery retry reason
or a dead letter.

The suite-level grep (tests/reliability/test_9_no_ids_in_logs.py) covers what real processes
logged; these are the three ways the review found in: a token with a trailing newline (httpx
quotes the header in "Illegal header value", and that error is retried), a transport whose error
text quotes the request, and errors on page 2 of a search (the `next` link's query carries the
patient id, and servers echo it).
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from celery.signals import task_retry

from clinragen_fhir import logs
from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker import tasks
from tests.fhir_batch import batching
from tests.observations import a1c

TOKEN = "tok-" + uuid.uuid4().hex
PID = "secret-patient-" + uuid.uuid4().hex[:8]
PAGE = "page-" + uuid.uuid4().hex[:8]  # an opaque page token in the `next` link
BASE = "http://127.0.0.1:9/fhir"


class H11LikeTransport(httpx.BaseTransport):
    """Refuses a header value h11 would refuse, with h11's message (it quotes the value)."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.inner = httpx.MockTransport(handler)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _, value in request.headers.raw:
            if value != value.strip() or b"\n" in value or b"\r" in value:
                raise httpx.LocalProtocolError(f"Illegal header value {value!r}")
        return self.inner.handle_request(request)


class QuotingTransport(httpx.BaseTransport):
    """A transport that fails, quoting the request (as proxies and TLS stacks can)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused {request.url} ({request.headers.get('authorization')})")


def page_two_fails(request: httpx.Request) -> httpx.Response:
    """Patient and page 1 answer; page 2 (a relative `next` link) answers 500, echoing it."""
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"  # stripped before sending
    path = request.url.path.removeprefix("/fhir").strip("/")
    if path == f"Patient/{PID}":
        return httpx.Response(200, json={"resourceType": "Patient", "id": PID})
    if "_getpages" in request.url.params:
        return httpx.Response(500, json={"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "exception",
            "diagnostics": f"page {request.url.query.decode()} failed for patient={PID}"}]})
    if path == "Observation":
        return httpx.Response(200, json={
            "resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": f"?_getpages={PAGE}&patient={PID}"}],
            "entry": [{"resource": a1c(PID, 7.4, 30, "o1")}]})
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})


@dataclass
class FakeState:
    """WorkerState in memory: every method the task calls (dead letters, delivery counts, the
    report lock), so no run here goes down the state-store-down fallback path."""

    letters: list[tuple[str, str]] = field(default_factory=list)
    deliveries: dict[tuple[str, int], int] = field(default_factory=dict)
    locks: dict[str, str] = field(default_factory=dict)

    def dead_letter(self, task: str, args: list[Any], error: str, retries: int) -> Any:
        self.letters.append((task, error))
        return type("Letter", (), {"id": "dl-1"})()

    def count_delivery(self, task_id: str, retries: int, ttl_s: int) -> int:
        key = (task_id, retries)
        self.deliveries[key] = self.deliveries.get(key, 0) + 1
        return self.deliveries[key]

    def forget_delivery(self, task_id: str, retries: int) -> None:
        self.deliveries.pop((task_id, retries), None)

    def acquire_report(self, key: str, owner: str, ttl_s: float, wait_s: float) -> bool:
        return self.locks.setdefault(key, owner) == owner

    def release_report(self, key: str, owner: str) -> bool:
        if self.locks.get(key) != owner:
            return False
        del self.locks[key]
        return True

    def mark_done(self, run: str, patient_id: str) -> None:
        return None


@dataclass
class Run:
    log: str
    retry_reasons: list[str]
    dead_letters: list[str]
    traceback: str

    def everything(self) -> str:
        return "\n".join([self.log, *self.retry_reasons, *self.dead_letters, self.traceback])


@pytest.fixture()
def run_task(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Run]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    for name in quiet:  # as logs.configure sets them in the worker
        logging.getLogger(name).setLevel(logging.WARNING)
    reasons: list[str] = []

    def on_retry(reason: Any = None, **_: Any) -> None:
        reasons.append(f"{reason!s} {reason!r}")

    task_retry.connect(on_retry, weak=False)
    kg = load_graph(None)
    monkeypatch.setattr("clinragen_fhir.fhir.client.time.sleep", lambda s: None)

    def run(transport: httpx.BaseTransport, **fhir: Any) -> Run:
        settings = Settings(fhir={"base_url": BASE, "auth": "bearer", "retries": 1, **fhir},
                            worker={"max_retries": 2, "retry_backoff_s": 0.01})
        state = FakeState()
        monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
        monkeypatch.setattr(tasks, "WorkerState", lambda url: state)
        client = FhirEndpoint.client
        monkeypatch.setattr(FhirEndpoint, "client", lambda self, transport_=None, observer=None:
                            client(self, transport=transport, observer=observer))
        result = tasks.diagnose.apply((PID,))
        assert result.failed()
        return Run(stream.getvalue(), list(reasons), [e for _, e in state.letters],
                   str(result.traceback))

    yield run
    task_retry.disconnect(on_retry)
    root.removeHandler(handler)
    root.setLevel(old_level)
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)


def assert_clean(run: Run) -> None:
    text = run.everything()
    assert TOKEN not in text
    assert PID not in text
    assert PAGE not in text  # the `next` link's query is redacted too
    for line in run.log.splitlines():
        json.loads(line)  # every line is one JSON object
    for fallback in ("delivery not counted", "delivery count not dropped",
                     "report lock unavailable", "could not dead-letter"):
        assert fallback not in run.log  # FakeState answered: no state-store-down path taken


@pytest.mark.parametrize("suffix", ["", "\n"], ids=["token", "token-with-newline"])
def test_page_two_errors_are_redacted_and_a_trailing_newline_is_stripped(
        run_task: Callable[..., Run], monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    monkeypatch.setenv("SITE_TOKEN", TOKEN + suffix)
    run = run_task(H11LikeTransport(batching(page_two_fails)), token_env="SITE_TOKEN")
    assert_clean(run)
    assert len(run.retry_reasons) == 2  # page 2's 500 is retried, then dead-lettered
    assert run.dead_letters and "HTTP 500" in run.dead_letters[0]
    assert "fhir retry" in run.log and "?_getpages=#" in run.log  # logged, by hash


def test_a_failing_transport_is_named_by_type_only(run_task: Callable[..., Run],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITE_TOKEN", TOKEN)
    run = run_task(QuotingTransport(), token_env="SITE_TOKEN")
    assert_clean(run)
    assert len(run.retry_reasons) == 2
    assert run.dead_letters == [  # the batch of reads (fhir.patient_read), its entries named
        f"FhirUnavailable: POST batch[Patient/#{logs.hash_id(PID)[:10]}, Observation, "
        "DocumentReference, DiagnosticReport]: ConnectError"]


def test_a_token_that_cannot_be_a_header_is_refused_without_quoting_it(
        run_task: Callable[..., Run], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITE_TOKEN", TOKEN[:10] + "\n" + TOKEN[10:])
    run = run_task(H11LikeTransport(batching(page_two_fails)), token_env="SITE_TOKEN")
    assert TOKEN[:10] not in run.everything() and TOKEN[10:] not in run.everything()
    assert run.retry_reasons == []  # a config error is final
    assert run.dead_letters == ["FhirConfigError: the bearer token (token_env/file) is unusable: "
                                "empty, or has a space, newline or non-ASCII character"]
