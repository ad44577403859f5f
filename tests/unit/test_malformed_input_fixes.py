"""Regression tests for what tests/reliability's fuzzing found (each was a crash or a silent
drop): malformed webhook payloads, malformed search pages, readings past MAX_READINGS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from clinragen_fhir.encoding import labs as labs_module
from clinragen_fhir.encoding.labs import build_lab_frame
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.fhir.notifications import patients_in
from clinragen_fhir.knowledge import load_graph


@pytest.mark.parametrize("payload", [
    {"resourceType": "Bundle", "entry": [None, 3, {"resource": "x"}]},
    {"resourceType": "Bundle", "entry": True},
    {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Parameters",
                                                      "parameter": [None, {"name": 1}]}}]},
    {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "SubscriptionStatus", "notificationEvent": [1, {"focus": "Patient/x"}],
        "subscription": "not an object"}}]},
    {"resourceType": "Observation", "subject": "Patient/1"},
    {"resourceType": "Patient", "id": 5},
])
def test_patients_in_is_total_over_malformed_payloads(payload: dict[str, Any]) -> None:
    patients, _event = patients_in(payload)
    assert patients == set()


def test_patients_in_still_reads_well_formed_parts() -> None:
    payload = {"resourceType": "Bundle", "entry": [None, {"resource": {
        "resourceType": "Observation", "subject": {"reference": "Patient/p9"}}}]}
    assert patients_in(payload)[0] == {"p9"}


@pytest.mark.parametrize("page", [{"resourceType": "Bundle", "entry": [None]},
                                  {"resourceType": "Bundle", "entry": 7},
                                  {"resourceType": "Bundle", "link": ["next"]}])
def test_malformed_search_page_is_a_fhir_error(page: dict[str, Any]) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=page))
    with FhirClient("http://127.0.0.1:9/fhir", transport=transport, retries=0) as client, \
            pytest.raises(FhirError, match="not a list of objects"):
        list(client.search("Observation", {"patient": "p1"}))


def test_readings_past_the_cap_are_skipped_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labs_module, "MAX_READINGS", 3)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    obs = [{"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "effectiveDateTime": (now - timedelta(days=10 - i)).isoformat(),
            "valueQuantity": {"value": 7.0, "unit": "%", "code": "%"}} for i in range(5)]
    frame, skips = build_lab_frame(obs, load_graph(None), None, now)
    assert list(frame["observation_id"]) == ["Observation/o2", "Observation/o3", "Observation/o4"]
    assert [(s.reference, s.reason) for s in skips] == [
        (f"Observation/o{i}", "older than the newest 3 readings") for i in (0, 1)]
