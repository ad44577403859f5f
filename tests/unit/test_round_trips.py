"""FHIR round trips per patient (issue 17, item 2): one batch of reads, one transaction.

The worker reads the Patient, the Observations, the DocumentReferences, our reports of the
patient (the existence check) and, with the problem-list check on, the active Conditions in one
batch Bundle; pages beyond a search's first are the only other reads, under the same bounds as
a search of its own. It writes the report, its Provenance and the AuditEvents (read and write)
in one transaction, or the read AuditEvent alone when nothing changed. Fake servers here are
tests/unit/test_report_lifecycle.py's, answering batches through tests/fhir_batch.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError, FhirTooLarge
from clinragen_fhir.pipeline import diagnose_patient, diagnose_patients
from clinragen_fhir.predict.rules import RuleBaseline
from tests.fhir_batch import batching, is_batch
from tests.observations import a1c
from tests.unit.test_report_lifecycle import KG, PID, VersionedServer

BASE = "http://127.0.0.1:9/fhir"


class Counted(VersionedServer):
    """VersionedServer, every request kept: (kind, the request)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, httpx.Request]] = []
        self.answer = batching(super().handler)

    def handler(self, request: httpx.Request) -> httpx.Response:  # type: ignore[override]
        kind = "batch" if is_batch(request) else "transaction" if request.method == "POST" \
            else f"{request.method} {request.url.path.removeprefix('/fhir/')}"
        self.requests.append((kind, request))
        return self.answer(request)

    def kinds(self) -> list[str]:
        out = [k for k, _ in self.requests]
        self.requests.clear()
        return out


def run(server: Counted, audit: bool = True, **settings: Any) -> Any:
    with FhirClient(BASE, transport=httpx.MockTransport(server.handler), retries=0) as client:
        return diagnose_patient(client, KG, RuleBaseline(KG), PID,
                                ReportSettings(audit_events=audit, **settings))


def test_two_round_trips_first_run_unchanged_rerun_and_new_version() -> None:
    server = Counted()
    first = run(server)
    assert first.status == "written"
    assert server.kinds() == ["batch", "transaction"]
    assert run(server).status == "exists"  # predicted from the same inputs: no generation
    assert server.kinds() == ["batch", "transaction"]  # the read AuditEvent alone
    assert run(server, audit=False).status == "exists"
    assert server.kinds() == ["batch"]
    server.a1c = 8.4  # a cited value corrected: a new version
    again = run(server)
    assert again.status == "written" and again.version == "2"
    assert server.kinds() == ["batch", "transaction"]
    assert set(first.timings) >= {"fhir_read_s", "encode_s", "predict_s", "write_s"}


def test_the_batch_holds_the_reads_and_the_transaction_the_writes() -> None:
    server = Counted()
    run(server)
    (_, batch), (_, write) = server.requests
    urls = [e["request"]["url"] for e in json.loads(batch.content)["entry"]]
    assert [u.partition("?")[0] for u in urls] == [
        f"Patient/{PID}", "Observation", "DocumentReference", "DiagnosticReport"]
    assert all(e["request"]["method"] == "GET" for e in json.loads(batch.content)["entry"])
    assert "identifier=urn" in urls[3] and f"subject=Patient/{PID}" in urls[3]
    entries = json.loads(write.content)["entry"]
    types = [e["resource"]["resourceType"] for e in entries]
    assert types.count("DiagnosticReport") == types.count("Provenance") == 1
    events = [e for e in entries if e["resource"]["resourceType"] == "AuditEvent"]
    assert sorted(e["resource"]["action"] for e in events) == ["C", "R"]
    # every AuditEvent PUT by an id of the attempt: the transaction sent again verbatim (its
    # answer lost) writes neither twice
    assert all(e["request"]["method"] == "PUT" for e in events)
    assert len({e["request"]["url"] for e in events}) == 2


def test_the_problem_list_search_goes_in_the_same_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLINRAGEN_REPORT__PROBLEM_LIST", "CLINRAGEN_PROBLEM_LIST"):
        monkeypatch.delenv(name, raising=False)
    from clinragen_fhir.fhir import conditions

    monkeypatch.setattr(conditions, "problem_list_enabled", lambda *a: True)
    import clinragen_fhir.pipeline as pipeline

    monkeypatch.setattr(pipeline, "problem_list_enabled", lambda *a: True)
    server = Counted()
    outcome = run(server)
    assert outcome.status == "written" and outcome.problem_list
    assert [k for k, _ in server.requests] == ["batch", "transaction"]
    urls = [e["request"]["url"] for e in json.loads(server.requests[0][1].content)["entry"]]
    assert urls[-1].startswith("Condition?") and "clinical-status=" in urls[-1]


def test_a_batch_of_patients_is_a_batch_of_reads_and_a_transaction_each() -> None:
    server = Counted()
    with FhirClient(BASE, transport=httpx.MockTransport(server.handler), retries=0) as client:
        outcomes = diagnose_patients(client, KG, RuleBaseline(KG), [PID, PID], ReportSettings())
    assert [o.status for o in outcomes] == ["written", "written"]  # type: ignore[union-attr]
    assert server.kinds() == ["batch", "batch", "transaction", "transaction"]


def test_one_failing_patient_does_not_stop_the_batch() -> None:
    server = Counted()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/Patient/gone"):
            return httpx.Response(404, json={"resourceType": "OperationOutcome"})
        return server.handler(request)

    with FhirClient(BASE, transport=httpx.MockTransport(batching(handler)), retries=0) as c:
        gone, done = diagnose_patients(c, KG, RuleBaseline(KG), ["gone", PID],
                                       ReportSettings(audit_events=False))
    assert isinstance(gone, FhirHTTPError) and gone.status == 404 and not gone.retryable
    assert done.status == "written"  # type: ignore[union-attr]


# -- paging beyond the first page, under the search bounds --------------------------------------
def paged(pages: int, cycle: bool = False) -> tuple[list[str], Any]:
    """Patient p1 with `pages` pages of Observations (the first in the batch), each page a
    request of its own after the first; `cycle`: the last page links back to page 2."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        path = request.url.path.removeprefix("/fhir").strip("/")
        if path == "Patient/p1":
            return httpx.Response(200, json={"resourceType": "Patient", "id": "p1",
                                             "gender": "female", "birthDate": "1960-01-01"})
        if path == "Observation" or "_getpages" in request.url.params:
            n = int(request.url.params.get("_getpagesoffset", "0"))
            nxt = n + 1 if n + 1 < pages else (1 if cycle else None)
            link = [{"relation": "next", "url": f"{BASE}?_getpages=s&_getpagesoffset={nxt}"}] \
                if nxt is not None else []
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                             "link": link, "entry": [
                                                 {"resource": a1c("p1", 7.0 + n / 10, 30 + n,
                                                                  f"o{n}")}]})
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})

    return asked, batching(handler)


def test_pages_beyond_the_first_are_read_one_request_each() -> None:
    asked, handler = paged(3)
    with FhirClient(BASE, transport=httpx.MockTransport(handler), retries=0) as client:
        [patient, observations] = client.batch_search([
            ("Patient/p1", None), ("Observation", {"patient": "p1"})])
    assert isinstance(observations, list) and isinstance(patient, list)
    assert [o["id"] for o in observations] == ["o0", "o1", "o2"]
    assert len([u for u in asked if "_getpages" in u]) == 2  # pages 2 and 3


def test_batch_paging_keeps_the_page_limit_and_the_cycle_check() -> None:
    _, handler = paged(10_000)
    with FhirClient(BASE, transport=httpx.MockTransport(handler), retries=0,
                    max_pages=5) as client, pytest.raises(FhirTooLarge, match="max_pages"):
        client.batch_search([("Observation", {"patient": "p1"})])
    _, handler = paged(3, cycle=True)
    with FhirClient(BASE, transport=httpx.MockTransport(handler), retries=0) as client, \
            pytest.raises(FhirError, match="paging cycle"):
        client.batch_search([("Observation", {"patient": "p1"})])


def test_an_answer_that_is_not_a_batch_response_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "batch-response",
                                         "entry": []})

    with FhirClient(BASE, transport=httpx.MockTransport(handler), retries=0) as client, \
            pytest.raises(FhirError, match="one entry per request"):
        client.batch(["Patient/p1"])
