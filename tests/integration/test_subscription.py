"""Trigger: a FHIR Subscription on HAPI -> our webhook -> the worker -> a DiagnosticReport.

Real parts only: HAPI FHIR (subscriptions on), `clinragen-fhir subscribe` registering an R4
rest-hook Subscription, `clinragen-fhir webhook` (uvicorn) receiving HAPI's delivery, a real
Celery worker process. The test POSTs one Observation to HAPI and does nothing else.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from clinragen_fhir.fhir.client import FhirClient
from tests.integration.hospital import (
    WEBHOOK_SECRET,
    cli,
    new_patient,  # noqa: F401 - fixture
    our_reports,
    wait_for,
    webhook_url,  # noqa: F401 - fixture
)
from tests.observations import a1c

pytestmark = pytest.mark.integration


@pytest.fixture()
def subscription(fhir: FhirClient, webhook_url: str,  # noqa: F811
                 new_patient: Callable[[list[tuple[float, int]]], str],  # noqa: F811
                 ) -> Iterator[tuple[str, str]]:
    """A patient without labs, and an active rest-hook Subscription on its lab Observations."""
    pid = new_patient([])
    # Scoped to this patient so other tests' writes never reach this receiver.
    criteria = f"Observation?category=laboratory&subject=Patient/{pid}"
    done = cli("subscribe", "--endpoint", webhook_url, "--criteria", criteria,
               CLINRAGEN_WEBHOOK_SECRET=WEBHOOK_SECRET)
    assert done.returncode == 0, done.stderr
    match = re.search(r"Subscription/([\w-]+)", done.stdout)
    assert match, done.stdout
    sid = match.group(1)
    sub = fhir.read("Subscription", sid)
    assert sub["channel"]["type"] == "rest-hook" and sub["criteria"] == criteria
    assert sub["channel"]["header"] == [f"X-Clinragen-Secret: {WEBHOOK_SECRET}"]
    wait_for("HAPI to activate the Subscription",
             lambda: fhir.read("Subscription", sid).get("status") == "active", 60)
    yield pid, sid
    fhir.delete("Subscription", sid)


def test_posted_observation_leads_to_a_report_with_no_other_action(
        fhir: FhirClient, worker: subprocess.Popen[bytes],
        subscription: tuple[str, str]) -> None:
    pid, _ = subscription
    assert our_reports(fhir, pid) == []
    started = time.monotonic()
    created = fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": a1c(pid, 7.9, 3), "request": {"method": "POST", "url": "Observation"}}]})
    obs_ref = created["entry"][0]["response"]["location"].split("/_history")[0]
    reports = wait_for("a DiagnosticReport written through the subscription",
                       lambda: our_reports(fhir, pid), 120, every_s=1)
    elapsed = time.monotonic() - started
    print(f"\nObservation POST -> report on the server: {elapsed:.1f} s")
    assert len(reports) == 1
    report = reports[0]
    assert report["status"] == "preliminary"
    assert [r["reference"].split("/_history/")[0] for r in report["result"]] == [obs_ref]
    codes = {c["code"] for cc in report["conclusionCode"] for c in cc["coding"]}
    assert "44054006" in codes or "73211009" in codes, codes  # diabetes (type 2 or any)
    assert report["presentedForm"][0]["contentType"].startswith("text/html")
    # One change, one delivery, one report: nothing else arrives later.
    time.sleep(3)
    assert len(our_reports(fhir, pid)) == 1
