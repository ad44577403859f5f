"""Trigger: polling by `_lastUpdated` with a persisted cursor (the Celery beat task), on HAPI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.worker.state import WorkerState
from tests.integration.hospital import new_patient, our_reports, wait_for  # noqa: F401
from tests.observations import a1c

pytestmark = pytest.mark.integration


@pytest.fixture()
def cursor() -> Iterator[WorkerState]:
    """The poll cursor for the test server, set to 'a few seconds ago' and restored after."""
    state, base = WorkerState(Settings().state_url), os.environ["CLINRAGEN_FHIR__BASE_URL"]
    before = state.cursor(base)
    since = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    state.set_cursor(base, json.dumps({"since": since, "boundary": []}))
    yield state
    if before is not None:
        state.set_cursor(base, before)


def test_poll_finds_the_changed_patient_and_advances_its_cursor(
        fhir: FhirClient, worker: subprocess.Popen[bytes], cursor: WorkerState,
        new_patient: Callable[[list[tuple[float, int]]], str]) -> None:  # noqa: F811
    from clinragen_fhir.worker.app import app

    pid = new_patient([])
    fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": a1c(pid, 8.1, 2), "request": {"method": "POST", "url": "Observation"}}]})
    first = app.send_task("clinragen.poll", kwargs={"debounce_s": 1}).get(timeout=120)
    assert first["changed_patients"] >= 1 and first["queued"] >= 1, first
    reports = wait_for("the polled patient's report", lambda: our_reports(fhir, pid), 120)
    assert len(reports) == 1 and reports[0]["status"] == "preliminary"
    stored = json.loads(cursor.cursor(os.environ["CLINRAGEN_FHIR__BASE_URL"]) or "{}")
    assert stored["since"] == first["cursor"] and stored["boundary"]
    # Nothing new since: the same change is not picked up twice.
    second = app.send_task("clinragen.poll", kwargs={"debounce_s": 1}).get(timeout=120)
    assert second["changed_patients"] == 0 and second["queued"] == 0, second
    assert len(our_reports(fhir, pid)) == 1
