"""The backfill's patients (issue 14, item 6) against httpx.MockTransport: repeated search
parameters survive into the request, `$export` is used where the capability statement lists it
(kick-off, polling with Retry-After, NDJSON outputs), and search is the fallback."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qsl

import httpx
import pytest

from clinragen_fhir.fhir.bulk import backfill_patients, export_patients, supports_export
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirTooLarge

BASE = "http://fhir.test/fhir"


def _bundle(*resources: dict) -> httpx.Response:
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                     "entry": [{"resource": r} for r in resources]})


def _caps(export: bool) -> dict:
    ops = [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/"
            "OperationDefinition/patient-export"}] if export else []
    return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [
        {"type": "Patient", "operation": [{"name": "everything"}, *ops]},
        {"type": "Group", "operation": ops}]}]}


def _client(handler, **kw) -> FhirClient:
    return FhirClient(BASE, transport=httpx.MockTransport(handler), backoff=0.001,
                      allow_insecure_http=True, **kw)


def test_repeated_parameters_survive_into_the_url() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return _bundle({"resourceType": "Patient", "id": "p1"})

    query = "birthdate=ge1950-01-01&birthdate=le1960-12-31&address-state=CA"
    with _client(handler) as client:
        found = backfill_patients(client, parse_qsl(query), use_export=True)
    assert found.patients == ["p1"] and found.source == "search"
    pairs = parse_qsl(seen[-1].query.decode())
    assert ("birthdate", "ge1950-01-01") in pairs and ("birthdate", "le1960-12-31") in pairs
    assert ("address-state", "CA") in pairs and ("_elements", "id") in pairs
    # a query with filters never asks for $export (an export cannot apply them)
    assert all("$export" not in str(u) and "metadata" not in str(u) for u in seen)


def test_client_search_takes_pairs_and_keeps_count_once() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return _bundle()

    with _client(handler, page_size=50) as client:
        list(client.search("Observation", [("date", "ge2020"), ("date", "lt2021")]))
        list(client.search("Observation", [("_count", "7"), ("code", "x")]))
    first, second = (parse_qsl(u.query.decode()) for u in seen)
    assert first == [("_count", "50"), ("date", "ge2020"), ("date", "lt2021")]
    assert second == [("_count", "7"), ("code", "x")]


def test_server_without_export_falls_back_to_search() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.endswith("/metadata"):
            return httpx.Response(200, json=_caps(export=False))
        rtype = request.url.path.rsplit("/", 1)[1]
        assert dict(parse_qsl(request.url.query.decode()))["_lastUpdated"] == "ge2024-01-01"
        if rtype == "Patient":
            return _bundle({"resourceType": "Patient", "id": "p1"})
        return _bundle({"resourceType": rtype, "id": "x",
                        "subject": {"reference": "Patient/p2"}})

    with _client(handler) as client:
        found = backfill_patients(client, since="2024-01-01", use_export=True)
    assert found.source == "search" and found.patients == ["p1", "p2"]
    assert not any("$export" in p for p in paths)
    assert sorted(p.rsplit("/", 1)[1] for p in paths[1:]) == [
        "DocumentReference", "Observation", "Patient"]


def test_export_refused_falls_back_to_search() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/metadata"):
            return httpx.Response(200, json=_caps(export=True))
        if "$export" in request.url.path:
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-supported", "diagnostics": "no"}]})
        return _bundle({"resourceType": "Patient", "id": "p9"})

    with _client(handler) as client:
        found = backfill_patients(client, use_export=True)
    assert (found.source, found.patients) == ("search", ["p9"])


def _export_server(polls_before_done: int, outputs: dict[str, bytes]):
    state = {"polls": 0, "kick": None}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/metadata"):
            return httpx.Response(200, json=_caps(export=True))
        if path.endswith("/$export"):
            state["kick"] = request
            return httpx.Response(202, headers={
                "Content-Location": f"{BASE}/$export-poll-status?_jobId=j1"})
        if path.endswith("/$export-poll-status"):
            state["polls"] += 1
            if state["polls"] <= polls_before_done:
                return httpx.Response(202, headers={"Retry-After": "120", "X-Progress": "busy"})
            return httpx.Response(200, json={
                "transactionTime": "2026-01-01T00:00:00Z", "request": "x",
                "requiresAccessToken": True, "error": [],
                "output": [{"type": t, "url": f"{BASE}/Binary/{t}"} for t in outputs]})
        if "/Binary/" in path:
            assert request.headers["Accept"] == "application/fhir+ndjson"
            return httpx.Response(200, content=outputs[path.rsplit("/", 1)[1]],
                                  headers={"Content-Type": "application/fhir+ndjson"})
        raise AssertionError(f"unexpected {request.method} {path}")

    return handler, state


def _ndjson(*resources: dict) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in resources) + b"\n"


def test_export_kick_off_poll_and_outputs() -> None:
    outputs = {
        "Patient": _ndjson({"resourceType": "Patient", "id": "a"},
                           {"resourceType": "Patient", "id": "b"}),
        "Observation": _ndjson({"resourceType": "Observation", "id": "o",
                                "subject": {"reference": "Patient/c"}}),
        # a server that answers Binary/<id> as FHIR JSON: the NDJSON is in `data`
        "DocumentReference": json.dumps({"resourceType": "Binary", "data": base64.b64encode(
            _ndjson({"resourceType": "DocumentReference", "id": "d",
                     "subject": {"reference": "Patient/a"}})).decode()}).encode(),
    }
    handler, state = _export_server(2, outputs)
    waits: list[float] = []
    with _client(handler) as client:
        found = backfill_patients(client, since="2025-06-01T00:00:00Z", use_export=True,
                                  max_wait_s=3.0, sleep=waits.append)
    assert found.source == "export" and found.patients == ["a", "b", "c"]
    assert found.transaction_time == "2026-01-01T00:00:00Z"
    assert found.outputs == {"Patient": 2, "Observation": 1, "DocumentReference": 1}
    assert waits == [3.0, 3.0]  # Retry-After: 120, bounded by max_wait_s
    kick = state["kick"]
    assert kick.headers["Prefer"] == "respond-async"
    assert kick.url.path == "/fhir/Patient/$export"
    params = dict(parse_qsl(kick.url.query.decode()))
    assert params["_type"] == "Patient,Observation,DocumentReference"
    assert params["_since"] == "2025-06-01T00:00:00Z"


def test_group_export_uses_the_group_path() -> None:
    handler, state = _export_server(0, {"Patient": _ndjson({"resourceType": "Patient",
                                                            "id": "g1"})})
    with _client(handler) as client:
        found = backfill_patients(client, group="cohort-1", use_export=True)
    assert found.patients == ["g1"] and state["kick"].url.path == "/fhir/Group/cohort-1/$export"


def test_export_is_bounded() -> None:
    handler, _ = _export_server(10_000, {})
    with _client(handler) as client, pytest.raises(FhirError, match="timeout_s"):
        export_patients(client, timeout_s=5.0, max_wait_s=1.0, sleep=lambda s: None)
    big = {"Patient": _ndjson(*({"resourceType": "Patient", "id": f"p{i}"} for i in range(50)))}
    handler, _ = _export_server(0, big)
    with _client(handler, max_search_bytes=200) as client, pytest.raises(FhirTooLarge):
        export_patients(client)


def test_export_outputs_on_another_origin_are_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/$export"):
            return httpx.Response(202, headers={
                "Content-Location": "http://elsewhere.test/status/1"})
        raise AssertionError("followed a foreign status URL")

    with _client(handler) as client, pytest.raises(FhirError, match="another origin"):
        export_patients(client)


def test_supports_export_reads_the_capability_statement() -> None:
    assert supports_export(_caps(True)) and supports_export(_caps(True), group="g")
    assert not supports_export(_caps(False)) and not supports_export({})
    system = {"rest": [{"mode": "server", "operation": [{"name": "export"}], "resource": []}]}
    assert supports_export(system) and not supports_export(system, group="g")
