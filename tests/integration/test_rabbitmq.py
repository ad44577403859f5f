"""RabbitMQ as the broker: a real worker on amqp:// runs `diagnose` end to end against HAPI.

RabbitMQ is Debian's rabbitmq-server, started by deploy/rabbitmq/start (`make services`). The
result backend stays Redis (its own database here), as a site with RabbitMQ would run it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.worker.app import make_app
from tests.integration.conftest import ROOT, worker_env
from tests.integration.hospital import new_patient, our_reports  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
AMQP = os.environ.get("CLINRAGEN_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("CLINRAGEN_TEST_AMQP_BACKEND", "redis://127.0.0.1:6379/6")


@pytest.fixture(scope="module")
def amqp_app() -> Iterator[Celery]:
    """A worker process consuming from RabbitMQ, and a Celery app that sends to it."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not answering on 127.0.0.1:5672 (deploy/rabbitmq/start): {exc}")
    app = make_app(Settings(broker_url=AMQP, result_backend=BACKEND))
    app.control.purge()  # earlier runs' leftovers
    log_path = ROOT / ".run" / "test-worker-rabbitmq.log"
    log_path.parent.mkdir(exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinragen_fhir.cli", "worker", "-n", "rmq@%h",
         "--concurrency", "1"],
        env=worker_env(CLINRAGEN_BROKER_URL=AMQP, CLINRAGEN_RESULT_BACKEND=BACKEND),
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not app.control.inspect(timeout=1, destination=[f"rmq@{socket.gethostname()}"]).ping():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"RabbitMQ worker not answering: {log_path.read_text()[-2000:]}")
    yield app
    proc.terminate()
    proc.wait(30)
    log.close()


def test_diagnose_through_rabbitmq(fhir: FhirClient, amqp_app: Celery,
                                   new_patient: Callable[[list[tuple[float, int]]], str],  # noqa: F811
                                   ) -> None:
    pid = new_patient([(6.2, 400), (7.3, 10)])
    started = time.monotonic()
    first = amqp_app.send_task("clinragen.diagnose", args=[pid]).get(timeout=180)
    print(f"\ndiagnose via RabbitMQ: {time.monotonic() - started:.1f} s")
    assert first["status"] == "written", first
    reports = our_reports(fhir, pid)
    assert [r["id"] for r in reports] == [first["report_id"]]
    assert "44054006" in first["diagnoses"]
    # At-least-once delivery stays harmless on this broker too.
    again = amqp_app.send_task("clinragen.diagnose", args=[pid]).get(timeout=180)
    assert again["status"] == "exists" and again["identifier"] == first["identifier"]
    assert len(our_reports(fhir, pid)) == 1
