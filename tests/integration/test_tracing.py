"""Tracing as deployed (issue 15, item 5): a real `clinragen-fhir worker` process with
`[tracing] enabled` exports OTLP/HTTP to a collector on loopback while it diagnoses a patient on
HAPI. The collector here is a small OTLP receiver (protobuf ExportTraceServiceRequest, what the
OpenTelemetry Collector's otlphttp receiver takes): the run is one trace rooted at the task, no
byte of what was exported holds the patient id, and the AuditEvents on HAPI carry the trace id
and pass `$validate`.

The worker runs on Redis databases of its own (11, 12), so no other test's worker takes its task.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.report.audit import BALP_ENTITY_TYPE
from clinragen_fhir.worker.app import task_reprs
from tests.integration.conftest import FHIR_URL, ROOT
from tests.integration.hospital import new_patient  # noqa: F401 - fixture
from tests.integration.test_conformance import known_gap, validate

pytestmark = pytest.mark.integration
BROKER = "redis://127.0.0.1:6379/11"
BACKEND = "redis://127.0.0.1:6379/12"


class Collector:
    """An OTLP/HTTP traces receiver on 127.0.0.1: keeps each request, decoded, and its bytes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                assert self.path == "/v1/traces"
                assert self.headers.get("content-type") == "application/x-protobuf"
                outer.raw.append(body)
                outer.requests.append(MessageToDict(ExportTraceServiceRequest.FromString(body)))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, with its resource's attributes and ids in hex."""
        out = []
        for request in self.requests:
            for rs in request.get("resourceSpans", []):
                resource = {a["key"]: a["value"] for a in rs["resource"].get("attributes", [])}
                for ss in rs.get("scopeSpans", []):
                    for span in ss.get("spans", []):
                        out.append({**span, "resource": resource,
                                    "traceId": base64.b64decode(span["traceId"]).hex(),
                                    "parentSpanId": base64.b64decode(
                                        span.get("parentSpanId", "")).hex()})
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def traced_worker() -> Iterator[tuple[Collector, Celery]]:
    """The collector, and a traced worker process (prefork, 1 child) on private databases."""
    import redis

    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    collector = Collector()
    env = {**os.environ, "CLINRAGEN_BROKER_URL": BROKER, "CLINRAGEN_RESULT_BACKEND": BACKEND,
           "CLINRAGEN_TRACING__ENABLED": "true",
           "CLINRAGEN_TRACING__OTLP_ENDPOINT": collector.url,
           "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export within 0.1 s of a span's end
    log_path = ROOT / ".run" / "test-tracing-worker.log"
    log_path.parent.mkdir(exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "clinragen_fhir.cli", "worker", "-n",
                             "tracing@%h", "--concurrency", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    client = Celery("tracing-itest", broker=BROKER, backend=BACKEND, set_as_current=False)
    client.conf.task_default_queue = "clinragen"
    try:
        deadline = time.monotonic() + 60
        while not client.control.inspect(timeout=1).ping():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker not up: {Path(log_path).read_text()[-2000:]}")
        yield collector, client
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        client.close()
        collector.close()


def wait_for(what: str, check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {seconds} s")
        time.sleep(0.2)


def test_a_traced_worker_exports_one_trace_per_run_without_the_patient_id(
        traced_worker: tuple[Collector, Celery], fhir: FhirClient,
        new_patient: Callable[[list[tuple[float, int]]], str]) -> None:  # noqa: F811
    collector, client = traced_worker
    pid = new_patient([(6.9, 300), (7.6, 30)])
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
    result = client.send_task("clinragen.diagnose", (pid,), **task_reprs((pid,)))
    assert result.get(timeout=180)["status"] == "written"

    def run_span() -> list[dict[str, Any]]:
        return [s for s in collector.spans() if s["name"] == "run/clinragen.diagnose"]

    wait_for("task span", lambda: bool(run_span()), 30)
    [root] = run_span()
    trace_id = root["traceId"]
    assert root["resource"]["service.name"] == {"stringValue": "clinragen-fhir-worker"}
    assert not root["parentSpanId"]  # the CLI-side publish was not traced: the task is the root
    time.sleep(0.5)  # the last batch
    spans = [s for s in collector.spans() if s["traceId"] == trace_id]
    requests = [s for s in spans if s["kind"] == "SPAN_KIND_CLIENT"]
    # the batch of reads and the report transaction (docs/integration.md: 2 round trips)
    assert len(requests) >= 2, [s["name"] for s in spans]
    urls = [a["value"]["stringValue"] for s in requests for a in s.get("attributes", [])
            if a["key"] in ("url.full", "http.url")]
    assert urls and {u.rstrip("/") for u in urls} == {FHIR_URL}, urls
    # not one exported byte names the patient: decoded, and as sent
    assert pid not in json.dumps(collector.requests)
    assert all(pid.encode() not in raw for raw in collector.raw)

    events = list(fhir.search("AuditEvent", {"entity": f"Patient/{pid}", "date": f"ge{since}"}))
    assert {e["action"] for e in events} >= {"R", "C"}
    for event in events:
        [entity] = [x for x in event["entity"] if x["type"].get("system") == BALP_ENTITY_TYPE]
        assert entity["what"]["identifier"]["value"] == trace_id
        issues = [i for i in validate(event) if i["severity"] in ("error", "fatal")
                  and not known_gap(i)]
        assert not issues, issues
