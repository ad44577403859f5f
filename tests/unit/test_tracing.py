"""OpenTelemetry tracing (issue 15, item 5): a diagnose run is one trace, no span holds a
patient id, the trace id is on every AuditEvent, and tracing is off by default.

The worker's case runs the `diagnose` task eagerly, with the Celery and httpx instrumentations
turned on as `worker_process_init` turns them on, against a FHIR server on loopback (the global
httpx instrumentation wraps the real HTTP transport, so the client is the production one), and
exports to an in-memory span exporter through the same scrubbing processor as OTLP would get.
The webhook's case runs the ASGI receiver wrapped as `create_app` wraps it.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from celery import Celery
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.testclient import TestClient

from clinragen_fhir import tracing
from clinragen_fhir.config import Settings, TracingSettings
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.logs import hash_id
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.report.audit import BALP_ENTITY_TYPE, audit_event
from clinragen_fhir.webhook import WebhookConfig, make_app
from clinragen_fhir.worker import app as app_module
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.app import task_reprs
from tests.fhir_batch import batching
from tests.observations import a1c
from tests.unit.test_log_grep import FakeState

PID = "pt-" + uuid.uuid4().hex[:12]  # digits and letters: what a hospital's ids look like
SECRET = b"0123456789abcdef-secret"


# -- scrubbing --------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "clean"), [
    (f"http://127.0.0.1:8080/fhir/Patient/{PID}/_history/3",
     "http://127.0.0.1:8080/fhir/Patient/{id}/_history/{id}"),
    (f"/fhir/Observation?patient={PID}&category=laboratory,vital-signs&date=ge2024-01-01",
     "/fhir/Observation?patient=*&category=*&date=*"),
    (f"https://fhir.example/fhir?_getpages=abc&patient=Patient/{PID}",
     "https://fhir.example/fhir?_getpages=*&patient=*"),
    (f"/notify/Observation/{PID}", "/notify/Observation/{id}"),
    ("/notify/Patient/Alice", "/notify/Patient/{id}"),  # a type-shaped id is an id here
    (f"/reports/{PID}/_history/2", "/reports/{id}/_history/{id}"),
    (f"/fhir/{PID}", "/fhir/{id}"),  # digits: never a fixed word
    ("/fhir/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"),
    ("/fhir/Patient/$export", "/fhir/Patient/{id}"),
    ("/fhir/$export", "/fhir/$export"),
    (f"https://user:pw@h.example:8443/fhir/Patient/{PID}#frag",
     "https://h.example:8443/fhir/Patient/{id}"),
])
def test_urls_lose_ids_and_query_values(url: str, clean: str) -> None:
    assert tracing.scrub_url(url) == clean


def test_text_loses_references_urls_and_paths() -> None:
    text = (f"PUT /notify/Patient/{PID} failed for Patient/{PID} at "
            f"http://h/fhir/Observation?patient={PID}")
    assert tracing.scrub_text(text) == ("PUT /notify/Patient/{id} failed for Patient/{id} at "
                                        "http://h/fhir/Observation?patient=*")


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture()
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """The Celery and httpx instrumentations on, exporting to memory (scrubbed)."""
    exporter = InMemorySpanExporter()
    provider = tracing.provider_for(TracingSettings(enabled=True), "test", exporter=exporter)
    tracing.instrument(provider)
    try:
        yield provider, exporter
    finally:
        tracing.uninstrument()
        provider.shutdown()


def everything(span: ReadableSpan) -> list[str]:
    """Every string a span exports: name, attributes, events, links, status, resource."""
    out = [span.name, span.status.description or ""]
    attribute_sets = [span.attributes, span.resource.attributes,
                      *(e.attributes for e in span.events), *(lk.attributes for lk in span.links)]
    for attrs in attribute_sets:
        for key, value in (attrs or {}).items():
            out += [key, json.dumps(value, default=str)]
    out += [e.name for e in span.events]
    return out


def assert_no_patient_id(spans: tuple[ReadableSpan, ...]) -> None:
    for span in spans:
        for text in everything(span):
            assert PID not in text, (span.name, text)


class Loopback:
    """A FHIR server on 127.0.0.1 that answers through `handler(httpx.Request)`."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.handler = handler
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                url = outer.base + self.path.removeprefix("/fhir")
                request = httpx.Request(self.command, url, headers=dict(self.headers),
                                        content=body)
                response = outer.handler(request)
                content = response.read()
                self.send_response(response.status_code)
                self.send_header("Content-Type", response.headers.get(
                    "content-type", "application/fhir+json"))
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Loopback:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def fhir_server(posted: list[dict[str, Any]]) -> Callable[[httpx.Request], httpx.Response]:
    """A patient with two HbA1c readings; transactions are kept and answered 201."""
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        if request.method == "POST" and path == "":
            bundle = json.loads(request.content)
            posted.append(bundle)
            return httpx.Response(200, json={
                "resourceType": "Bundle", "type": "transaction-response", "entry": [
                    {"response": {"status": "201 Created", "location":
                                  f"{e['resource']['resourceType']}/x{i}/_history/1"}}
                    for i, e in enumerate(bundle["entry"])]})
        if path == f"Patient/{PID}":
            return httpx.Response(200, json={"resourceType": "Patient", "id": PID,
                                             "gender": "female", "birthDate": "1960-01-01"})
        found = [{**a1c(PID, v, d, f"o{i}"), "meta": {"versionId": "1"}}
                 for i, (v, d) in enumerate(((6.9, 400), (8.1, 20)))] \
            if path == "Observation" else []
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r} for r in found]})
    return handler


# -- the worker -------------------------------------------------------------------------------
def test_a_diagnose_run_is_one_trace_without_the_patient_id(
        traced: tuple[TracerProvider, InMemorySpanExporter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, exporter = traced
    posted: list[dict[str, Any]] = []
    kg = load_graph(None)
    with Loopback(batching(fhir_server(posted))) as server:
        settings = Settings(fhir={"base_url": server.base})
        monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
        monkeypatch.setattr(tasks, "WorkerState", lambda url: FakeState())
        result = tasks.diagnose.apply((PID,))
    assert result.successful(), result.traceback
    assert result.result["status"] == "written"

    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1  # one trace
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["run/clinragen.diagnose"]
    requests = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(requests) >= 2  # the batch of reads (Patient, searches), the report transaction
    assert all(s.parent is not None and s.parent.span_id == roots[0].context.span_id
               for s in requests)
    assert_no_patient_id(spans)
    urls = {str(s.attributes.get("url.full", s.attributes.get("http.url")))
            for s in requests if s.attributes}
    assert {u.rstrip("/") for u in urls} == {server.base}  # POSTs to the base: no id in them

    trace_id = f"{roots[0].context.trace_id:032x}"
    # the FHIR server got the trace (W3C traceparent) with every request
    assert all(h.get("traceparent", "").split("-")[1] == trace_id for h in server.headers)
    # and every AuditEvent written in the run carries it, as BALP's transaction entity
    events = [e["resource"] for b in posted for e in b["entry"]
              if e["resource"]["resourceType"] == "AuditEvent"]
    assert {e["action"] for e in events} >= {"R", "C"}
    for event in events:
        [entity] = [x for x in event["entity"] if x["type"].get("system") == BALP_ENTITY_TYPE]
        assert entity["type"]["code"] == "XrequestId"
        assert entity["what"]["identifier"]["value"] == trace_id


def test_exception_messages_and_stack_traces_are_not_exported(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    with pytest.raises(ValueError), tracer.start_as_current_span(f"GET /fhir/Patient/{PID}"):
        raise ValueError(f"no Patient/{PID} and no {PID}")
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /fhir/Patient/{id}"
    [event] = span.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert "exception.message" not in event.attributes
    assert "exception.stacktrace" not in event.attributes
    assert span.status.description == "ValueError"
    assert_no_patient_id((span,))


# -- the webhook ------------------------------------------------------------------------------
class Seen:
    def add(self, key: str, ttl_s: int) -> bool:
        return True


def test_the_webhook_request_and_its_publish_are_one_trace_without_the_patient_id(
        traced: tuple[TracerProvider, InMemorySpanExporter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    provider, exporter = traced
    fresh = Celery("tracing-test", broker="memory://", backend="cache+memory://",
                   set_as_current=False)
    fresh.conf.task_default_queue = "clinragen"
    monkeypatch.setattr(app_module.app, "send_task", fresh.send_task)
    app_module.app.set_current()  # the instrumentation finds the task by name in it
    seen_in: list[str | None] = []

    def enqueue(pid: str, countdown: int) -> None:
        seen_in.append(tracing.trace_id())
        tasks.diagnose.apply_async((pid,), countdown=countdown, ignore_result=True,
                                   **task_reprs((pid,)))

    app = tracing.asgi(make_app(WebhookConfig(secret=SECRET), Seen(), enqueue), provider)
    sender = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # as a server sends it
    with TestClient(app) as client:
        answer = client.put(f"/notify/Patient/{PID}", json={"resourceType": "Patient",
                                                           "id": PID},
                            headers={"X-Clinragen-Secret": SECRET.decode(),
                                     "traceparent": sender})
        assert client.get("/health").status_code == 200
    assert answer.status_code == 200, answer.text

    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]  # /health: no span
    assert server.name == "PUT /notify/Patient/{id}"
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    assert f"{server.context.trace_id:032x}" == trace_id  # the sender's trace continued
    assert seen_in == [trace_id]
    [publish] = [s for s in spans if s.kind == SpanKind.PRODUCER]
    assert publish.name == "apply_async/clinragen.diagnose"
    assert publish.parent is not None and publish.parent.span_id == server.context.span_id
    assert_no_patient_id(spans)
    with fresh.connection_for_read() as conn:  # the task message carries the trace
        queue = conn.SimpleQueue("clinragen")
        message = queue.get(timeout=1)
        message.ack()
        queue.close()
    assert message.headers["traceparent"].split("-")[1] == trace_id
    assert hash_id(PID) in message.headers["argsrepr"]
    fresh.close()


# -- off by default ---------------------------------------------------------------------------
def test_tracing_is_off_by_default_and_audit_events_have_no_trace() -> None:
    assert Settings().tracing.enabled is False
    assert tracing.setup(TracingSettings(), "worker") is None
    assert tracing.trace_id() is None
    app = make_app(WebhookConfig(secret=SECRET), Seen(), lambda pid, countdown: None)
    assert tracing.asgi(app, None) is app
    event = audit_event("R", PID, interactions=["read"])
    assert all(e["type"].get("system") != BALP_ENTITY_TYPE for e in event["entity"])


def test_a_plain_http_collector_off_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FhirConfigError, match=r"tracing\.otlp_endpoint"):
        tracing.provider_for(TracingSettings(enabled=True,
                                             otlp_endpoint="http://collector.example/v1/traces"),
                             "worker")
    provider = tracing.provider_for(TracingSettings(
        enabled=True, otlp_endpoint="http://collector.example/v1/traces",
        allow_insecure_http=True), "worker")
    provider.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.hospital.example:4318/")
    assert tracing.otlp_endpoint(TracingSettings()) == (
        "https://otel.hospital.example:4318/v1/traces")


def test_the_worker_starts_tracing_in_each_pool_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.signals import worker_process_init

    started: list[tuple[bool, str]] = []
    monkeypatch.setattr(tracing, "setup", lambda settings, kind, **_: started.append(
        (settings.enabled, kind)))
    monkeypatch.setenv("CLINRAGEN_TRACING__ENABLED", "true")
    worker_process_init.send(sender=None)
    assert started == [(True, "worker")]


def test_a_pool_process_exports_its_last_spans_before_it_exits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.signals import worker_process_shutdown

    exporter = InMemorySpanExporter()
    provider = tracing.provider_for(TracingSettings(enabled=True), "worker", exporter=exporter)
    flushed: list[int] = []
    monkeypatch.setattr(provider, "force_flush", lambda ms: flushed.append(ms) or True)
    monkeypatch.setattr(tracing, "_providers", [provider])
    worker_process_shutdown.send(sender=None, pid=1, exitcode=0)
    assert flushed == [5000] and tracing._providers == []


def test_the_cds_hooks_report_page_is_traced_without_the_report_id(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """cds_hooks.create_app wraps its app the same way: `/reports/<id>` is scrubbed too."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    provider, exporter = traced

    async def page(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = tracing.asgi(Starlette(routes=[Route("/reports/{rid}/_history/{v}", page)]), provider)
    with TestClient(app) as client:
        assert client.get(f"/reports/{PID}/_history/2?patient={PID}").status_code == 200
    [server] = exporter.get_finished_spans()
    assert server.name == "GET /reports/{id}/_history/{id}"
    assert_no_patient_id((server,))
