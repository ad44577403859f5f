"""A report transaction the server committed but answered 500: the client's retry sends it again.

The report is a conditional create (one report), the Provenance a PUT by id (one Provenance); the
write AuditEvent must be one as well. A small fake FHIR server (httpx.MockTransport) keeps
resources the way a server does: POST assigns a new id, PUT keeps the client's, `ifNoneExist`
matches an identifier already stored.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.report.audit import attempt_event_id, audit_bundle, audit_event
from tests.fake_fhir import StoreServer
from tests.fhir_batch import batching

PID = "p-audit-1"


class FakeServer(StoreServer):
    """Transactions are stored entry by entry; the first report transaction is committed and
    then answered 500 (the answer is lost), as the reliability suite's proxy does on HAPI."""

    def __init__(self) -> None:
        super().__init__(PID)
        self.report_transactions = 0

    def after_transaction(self, bundle: dict[str, Any]) -> httpx.Response | None:
        if any(e["resource"]["resourceType"] == "DiagnosticReport" for e in bundle["entry"]):
            self.report_transactions += 1
            if self.report_transactions == 1:
                return httpx.Response(500, json={"resourceType": "OperationOutcome"})
        return None

    def count(self, rtype: str, action: str | None = None) -> int:
        return sum(1 for r in self.of_type(rtype)
                   if action is None or r.get("action") == action)


def test_retried_committed_transaction_writes_one_write_audit_event() -> None:
    server = FakeServer()
    kg = load_graph(None)
    with FhirClient("http://127.0.0.1:9/fhir",
                    transport=httpx.MockTransport(batching(server.handler)),
                    retries=3, backoff=0.001) as client:
        outcome = diagnose_patient(client, kg, RuleBaseline(kg), PID, ReportSettings())
    assert outcome.status == "written"
    assert server.report_transactions == 2  # committed, answered 500, sent again
    assert server.count("DiagnosticReport") == 1
    assert server.count("Provenance") == 1
    assert server.count("AuditEvent", "C") == 1  # was 2: the retry POSTed a second event
    assert server.count("AuditEvent", "R") == 1


def test_write_events_are_put_by_an_id_of_the_attempt() -> None:
    ev = audit_event("C", "p1", interactions=["transaction", "create"])
    eid = attempt_event_id("write", "urn:sys", "key1", ev["recorded"])
    assert eid == attempt_event_id("write", "urn:sys", "key1", ev["recorded"])  # deterministic
    assert eid != attempt_event_id("write", "urn:sys", "key1", "2025-01-01T00:00:00+00:00")
    assert eid != attempt_event_id("write", "urn:sys", "key2", ev["recorded"])
    assert len(eid) <= 64 and not eid.isdigit() and "p1" not in eid
    _, entry = audit_bundle([ev], ids=[eid])["entry"]
    assert entry["request"] == {"method": "PUT", "url": f"AuditEvent/{eid}"}
    assert entry["resource"]["id"] == eid
    read = audit_bundle([audit_event("R", "p1", interactions=["read"])])["entry"][1]
    assert read["request"] == {"method": "POST", "url": "AuditEvent"}  # reads stay POSTs
    assert Counter(e["request"]["method"] for e in audit_bundle([ev])["entry"]) == {"POST": 2}
