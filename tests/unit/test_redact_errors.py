"""Server error texts never carry patient ids into exceptions, logs or the DLQ reason.

Found by tests/reliability: HAPI answers `GET Patient/x` for an unknown x with "HAPI-2001:
Resource Patient/x is not known", and that text went into the task's error log line.
"""

from __future__ import annotations

import httpx
import pytest

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirHTTPError
from clinragen_fhir.fhir.urls import redact_text
from clinragen_fhir.logs import hash_id


def test_server_diagnostics_echoing_ids_are_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        pid = request.url.path.rsplit("/", 1)[-1] if "Patient/" in request.url.path \
            else request.url.params.get("patient", "")
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "not-found",
            "diagnostics": f"HAPI-2001: Resource Patient/{pid} is not known; id {pid}"}]})

    with FhirClient("http://127.0.0.1:9/fhir", transport=httpx.MockTransport(handler),
                    retries=0) as client:
        with pytest.raises(FhirHTTPError) as read:
            client.read("Patient", "secret-patient-42")
        with pytest.raises(FhirHTTPError) as search:
            list(client.search("Observation", {"patient": "secret-patient-43"}))
    for err, pid in ((read.value, "secret-patient-42"), (search.value, "secret-patient-43")):
        assert pid not in str(err) and pid not in err.detail
        assert f"#{hash_id(pid)[:10]}" in str(err)
        assert "HAPI-2001" in str(err) and err.status == 404


def test_redact_text_keeps_what_is_not_an_id() -> None:
    text = "HAPI-0450: Failed to parse request body as JSON resource; application/fhir+json"
    assert redact_text(text) == text
    assert "Encounter/e-1" not in redact_text("bad reference Encounter/e-1")
