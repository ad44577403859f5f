"""A report transaction the server committed but answered 500: the client's retry sends it again.

The report is a conditional create (one report), the Provenance a PUT by id (one Provenance); the
write AuditEvent must be one as well. A small fake FHIR server (httpx.MockTransport) keeps
resources the way a server does: POST assigns a new id, PUT keeps the client's, `ifNoneExist`
matches an identifier already stored.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import httpx

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.report.audit import attempt_event_id, audit_bundle, audit_event
from tests.fhir_batch import batching
from tests.observations import a1c

PID = "p-audit-1"


class FakeServer:
    """Transactions are stored entry by entry; the first report transaction is committed and
    then answered 500 (the answer is lost), as the reliability suite's proxy does on HAPI."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.report_transactions = 0

    def _bundle(self, resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": r} for r in resources]}

    def _match(self, rtype: str, query: str) -> str | None:
        """The id of a stored `rtype` with the identifier `identifier=system|value`."""
        system, _, value = query.removeprefix("identifier=").partition("|")
        return next((rid for (t, rid), r in self.store.items() if t == rtype and any(
            i.get("system") == system and i.get("value") == value
            for i in r.get("identifier", []))), None)

    def _put_id(self, rtype: str, url: str) -> str:
        """PUT Type/id keeps the id; a conditional update (`Type?identifier=...`, the report
        lifecycle) updates the match, else creates with a new id, as HAPI does."""
        if "?" not in url:
            return url.split("/")[1]
        return self._match(rtype, url.partition("?")[2]) or str(next(self.ids))

    def transaction(self, bundle: dict[str, Any]) -> httpx.Response:
        out = []
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            rtype = resource["resourceType"]
            match = self._match(rtype, request.get("ifNoneExist") or "") \
                if request.get("ifNoneExist") else None
            if match:  # as HAPI answers a conditional create that matched
                out.append({"response": {"status": "200 OK",
                                         "location": f"{rtype}/{match}/_history/1"}})
                continue
            rid = self._put_id(rtype, request["url"]) if request["method"] == "PUT" \
                else str(next(self.ids))
            self.store[(rtype, rid)] = {**resource, "id": rid}
            out.append({"response": {"status": "201 Created",
                                     "location": f"{rtype}/{rid}/_history/1"}})
        if any(e["resource"]["resourceType"] == "DiagnosticReport" for e in bundle["entry"]):
            self.report_transactions += 1
            if self.report_transactions == 1:
                return httpx.Response(500, json={"resourceType": "OperationOutcome"})
        return httpx.Response(200, json={"resourceType": "Bundle",
                                         "type": "transaction-response", "entry": out})

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        if request.method == "POST" and path == "":
            return self.transaction(json.loads(request.content))
        if path == f"Patient/{PID}":
            return httpx.Response(200, json={"resourceType": "Patient", "id": PID,
                                             "gender": "female", "birthDate": "1960-01-01"})
        if path == "Observation":
            return httpx.Response(200, json=self._bundle([
                {**a1c(PID, v, d, f"o{i}"), "meta": {"versionId": "1"}}
                for i, (v, d) in enumerate(((6.9, 400), (7.4, 200), (8.1, 20)))]))
        if path == "DiagnosticReport":
            query = request.url.params.get("identifier", "")
            match = self._match("DiagnosticReport", query)
            found = [self.store[("DiagnosticReport", match)]] if match else []
            return httpx.Response(200, json=self._bundle(found))
        if path in ("DocumentReference",):
            return httpx.Response(200, json=self._bundle([]))
        return httpx.Response(404, json={"resourceType": "OperationOutcome"})

    def count(self, rtype: str, action: str | None = None) -> int:
        return sum(1 for (t, _), r in self.store.items()
                   if t == rtype and (action is None or r.get("action") == action))


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
