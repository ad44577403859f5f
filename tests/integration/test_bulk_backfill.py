"""The backfill by Bulk Data `$export` on the real HAPI (issue 14, item 6): kick-off with
`Prefer: respond-async`, the status URL polled, the NDJSON outputs read under the client's caps,
and the patients they name equal to what the search fallback finds.

deploy/hapi registers HAPI's BulkDataExportProvider (HAPI_BULK_EXPORT, on by default); a server
started from an older jar lacks it: restart it (deploy/hapi/stop && deploy/hapi/start).
CLINRAGEN_TEST_BULK_FHIR points this test at another instance.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from clinragen_fhir.fhir.bulk import backfill_patients, search_patients, supports_export
from clinragen_fhir.fhir.client import FhirClient
from tests.integration.conftest import FHIR_URL

pytestmark = pytest.mark.integration

BULK_URL = os.environ.get("CLINRAGEN_TEST_BULK_FHIR", FHIR_URL)


@pytest.fixture()
def bulk_fhir() -> Iterator[FhirClient]:
    with FhirClient(BULK_URL, timeout=120, allow_insecure_http=True) as client:
        try:
            caps = client.capabilities()
        except Exception as exc:
            pytest.fail(f"HAPI FHIR is not answering at {BULK_URL}: {exc}")
        if not supports_export(caps):
            pytest.fail(f"{BULK_URL} lists no $export: restart deploy/hapi with the current jar")
        yield client


def test_export_backfill_finds_the_changed_patients(bulk_fhir: FhirClient) -> None:
    tag = uuid.uuid4().hex[:10]
    a, b, quiet = f"bulk-a-{tag}", f"bulk-b-{tag}", f"bulk-q-{tag}"
    bulk_fhir.update({"resourceType": "Patient", "id": quiet, "gender": "male"})
    # `_since`: the instant the quiet patient was written; everything after it is a change
    since = bulk_fhir.read("Patient", quiet)["meta"]["lastUpdated"]
    written = [
        {"resourceType": "Patient", "id": a, "gender": "female"},
        {"resourceType": "Patient", "id": b, "gender": "male"},
        {"resourceType": "Observation", "id": f"bulk-o-{tag}", "status": "final",
         "code": {"text": "glucose"}, "subject": {"reference": f"Patient/{b}"},
         "valueQuantity": {"value": 5.4, "unit": "mmol/L"}},
        {"resourceType": "DocumentReference", "id": f"bulk-d-{tag}", "status": "current",
         "subject": {"reference": f"Patient/{a}"},
         "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZQ=="}}]},
    ]
    try:
        time.sleep(1.1)  # `_since` is inclusive to the second on some servers: move past it
        for resource in written:
            bulk_fhir.update(resource)
        exported = backfill_patients(bulk_fhir, since=since, use_export=True,
                                     timeout_s=240, max_wait_s=2.0)
        assert exported.source == "export"
        assert {a, b} <= set(exported.patients)
        assert exported.transaction_time
        assert exported.outputs.get("Observation", 0) >= 1
        searched = search_patients(bulk_fhir, since=since)
        assert {a, b} <= set(searched.patients)
        # a shared server may see other writes in between; ours agree either way
        mine = {a, b, quiet}
        assert set(exported.patients) & mine == set(searched.patients) & mine
        # a query with search filters is answered by search, never by an export
        filtered = backfill_patients(bulk_fhir, [("_id", a), ("_id", a)], use_export=True)
        assert (filtered.source, filtered.patients) == ("search", [a])
    finally:
        for resource in reversed(written):
            with contextlib.suppress(Exception):
                bulk_fhir.delete(resource["resourceType"], resource["id"])
        bulk_fhir.delete("Patient", quiet)
