"""Helpers for the hospital-integration tests (subscriptions, audit, RabbitMQ).

Kept apart from conftest.py, which the end-to-end tests own. Each test makes its own synthetic
patient (a random id, HbA1c readings chosen so the rule baseline concludes diabetes) and deletes
it afterwards, so these tests neither depend on nor disturb the Synthea patients.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from tests.integration.conftest import FHIR_URL, ROOT, worker_env
from tests.observations import a1c

SYSTEM = ReportSettings().identifier_system
WEBHOOK_SECRET = "itest-webhook-secret-" + uuid.uuid4().hex[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_patient(fhir: FhirClient, a1c_series: list[tuple[float, int]]) -> str:
    """A new Patient with these (value, days ago) HbA1c readings; returns its id."""
    pid = f"itest-{uuid.uuid4().hex[:16]}"
    entries: list[dict[str, Any]] = [{
        "resource": {"resourceType": "Patient", "id": pid, "gender": "female",
                     "birthDate": "1961-04-12"},
        "request": {"method": "PUT", "url": f"Patient/{pid}"}}]
    for i, (value, days) in enumerate(a1c_series):
        oid = f"{pid}-a1c-{i}"
        entries.append({"resource": a1c(pid, value, days, oid),
                        "request": {"method": "PUT", "url": f"Observation/{oid}"}})
    fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return pid


def delete_patient(pid: str) -> None:
    """The patient and everything that references it (reports, Provenance, AuditEvents)."""
    httpx.delete(f"{FHIR_URL}/Patient/{pid}", params={"_cascade": "delete"}, timeout=120)


@pytest.fixture()
def new_patient(fhir: FhirClient) -> Iterator[Callable[[list[tuple[float, int]]], str]]:
    """A factory of synthetic patients, deleted at teardown."""
    made: list[str] = []

    def factory(series: list[tuple[float, int]]) -> str:
        made.append(make_patient(fhir, series))
        return made[-1]

    yield factory
    for pid in made:
        delete_patient(pid)


def our_reports(fhir: FhirClient, pid: str) -> list[dict[str, Any]]:
    return list(fhir.search("DiagnosticReport", {"subject": f"Patient/{pid}",
                                                 "identifier": f"{SYSTEM}|"}))


def wait_for(what: str, check: Callable[[], Any], timeout_s: float,
             every_s: float = 0.5) -> Any:
    """Poll until `check()` is truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`clinragen-fhir ARGS` as a subprocess, the way an operator runs it."""
    return subprocess.run([sys.executable, "-m", "clinragen_fhir.cli", *args],
                          env=worker_env(**env), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def webhook_url() -> Iterator[str]:
    """A real receiver: `clinragen-fhir webhook` (uvicorn) on a loopback port."""
    port = free_port()
    (ROOT / ".run").mkdir(exist_ok=True)
    log_path = ROOT / ".run" / "test-webhook.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
    env = worker_env(CLINRAGEN_WEBHOOK_SECRET=WEBHOOK_SECRET, CLINRAGEN_WEBHOOK__DEBOUNCE_S="1",
                     CLINRAGEN_STATE_URL=os.environ.get("CLINRAGEN_TEST_STATE",
                                                        "redis://127.0.0.1:6379/5"))
    proc = subprocess.Popen([sys.executable, "-m", "clinragen_fhir.cli", "webhook", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"webhook exited: {Path(log_path).read_text()[-2000:]}")
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the webhook receiver", up, 60)
    yield f"{base}/notify"
    proc.terminate()
    proc.wait(30)
    log.close()
