"""The report lifecycle without a server (issue 14, item 1): the content fingerprint, and the
pipeline's writes against a fake FHIR server (httpx.MockTransport) that stores versions.

tests/integration/test_report_lifecycle.py runs the same on HAPI.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import httpx

from clinragen_fhir.cli import model_identity as cli_model_identity
from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.identity import RULE_BASELINE, model_identity
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction, Withheld
from clinragen_fhir.report.build import (
    EXT_BASE,
    FINGERPRINT_EXT,
    content_fingerprint,
    current_key,
    is_legacy_key,
    report_key,
)
from tests.fhir_batch import batching
from tests.observations import a1c

PID = "p-life-1"
SYSTEM = ReportSettings().identifier_system
KG = load_graph(None)


def prediction(value: float = 7.1, version: str = "2", probability: float = 0.9,
               rationale: str = "HbA1c 7.1 %", model_id: str = "") -> Prediction:
    ev = Evidence("Observation/o1", version, "4548-4", "HbA1c", value, "%",
                  "2024-03-02T00:00:00+00:00", f"HbA1c {value} %")
    return Prediction("clinragen-onnx", "1", "kg-abc",
                      [Diagnosis("44054006", "Diabetes mellitus type 2", probability, (ev,))],
                      rationale, model_id=model_id)


def test_fingerprint_changes_with_conclusions_evidence_and_model_only() -> None:
    fp = content_fingerprint(prediction())
    assert fp == content_fingerprint(prediction(probability=0.7, rationale="other words"))
    assert fp != content_fingerprint(prediction(value=7.4))  # evidence value
    assert fp != content_fingerprint(prediction(version="3"))  # cited version
    assert fp != content_fingerprint(prediction(model_id="onnx:0123456789abcdef"))  # retrained
    assert fp != content_fingerprint(dataclasses.replace(prediction(), diagnoses=[]))
    # the codes the report names as left out by the cap are part of what it says
    cut = dataclasses.replace(prediction(), withheld=[Withheld("38341003", "HTN", 0.97)])
    assert fp != content_fingerprint(cut)
    assert content_fingerprint(cut) == content_fingerprint(dataclasses.replace(
        cut, withheld=[Withheld("38341003", "HTN", 0.91)]))  # not its probability


def test_current_key_names_patient_and_method_not_inputs() -> None:
    key = current_key(PID, "clinragen-onnx")
    assert key.startswith("clinragen-onnx:") and PID not in key
    assert key != current_key(PID, "knowledge-rule-baseline") != current_key("p2", "x")
    assert not is_legacy_key(key)
    assert is_legacy_key(report_key(PID, [], prediction()))


def test_one_model_identity_for_cli_report_and_backfill(tmp_path: Path) -> None:
    assert cli_model_identity is model_identity  # one function, in the torch-free core
    assert model_identity(None) == RULE_BASELINE
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "manifest.json").write_text('{"a": 1}')
    first = model_identity(tmp_path)
    assert first.startswith("onnx:") and len(first) == 21
    (tmp_path / "onnx" / "manifest.json").write_text('{"a": 2}')
    assert model_identity(tmp_path) != first


class VersionedServer:
    """Stores DiagnosticReports with versions, answers conditional updates as HAPI does."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.transactions: list[dict[str, Any]] = []
        self.a1c = 7.4
        self.reading = a1c(PID, 7.4, 20, "o1")  # one effective time for every run
    def current(self, rtype: str) -> list[dict[str, Any]]:
        return [v[-1] for (t, _), v in self.store.items() if t == rtype]

    def _match(self, rtype: str, query: str) -> str | None:
        system, _, value = query.removeprefix("identifier=").partition("|")
        return next((rid for (t, rid), v in self.store.items() if t == rtype and any(
            i.get("system") == system and i.get("value") == value
            for i in v[-1].get("identifier", []))), None)

    def put(self, rtype: str, rid: str, resource: dict[str, Any]) -> str:
        versions = self.store.setdefault((rtype, rid), [])
        meta = {**resource.get("meta", {}), "versionId": str(len(versions) + 1)}
        versions.append({**resource, "id": rid, "meta": meta})
        return f"{rtype}/{rid}/_history/{meta['versionId']}"

    def transaction(self, bundle: dict[str, Any]) -> httpx.Response:
        self.transactions.append(bundle)
        out = []
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            rtype, url = resource["resourceType"], request["url"]
            if request.get("ifNoneExist") and (rid := self._match(rtype, request["ifNoneExist"])):
                out.append({"response": {"location": f"{rtype}/{rid}/_history/1"}})
                continue
            if request["method"] == "PUT":
                rid = url.split("/")[1] if "?" not in url else (
                    self._match(rtype, url.partition("?")[2]) or str(next(self.ids)))
            else:
                rid = str(next(self.ids))
            out.append({"response": {"location": self.put(rtype, rid, resource)}})
        return httpx.Response(200, json={"resourceType": "Bundle",
                                         "type": "transaction-response", "entry": out})

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        searchset = {"resourceType": "Bundle", "type": "searchset"}
        if request.method == "POST" and path == "":
            return self.transaction(json.loads(request.content))
        if path == f"Patient/{PID}":
            return httpx.Response(200, json={"resourceType": "Patient", "id": PID,
                                             "gender": "female", "birthDate": "1960-01-01"})
        if path == "Observation":
            version = "1" if self.a1c == 7.4 else "2"
            reading = {**self.reading, "meta": {"versionId": version},
                       "valueQuantity": {**self.reading["valueQuantity"], "value": self.a1c}}
            return httpx.Response(200, json={**searchset, "entry": [{"resource": reading}]})
        if path == "DiagnosticReport":
            query = request.url.params.get("identifier", "")
            found = self.current("DiagnosticReport")
            if query.endswith("|"):  # any value of our system
                found = [r for r in found if any(i.get("system") == query[:-1]
                                                 for i in r.get("identifier", []))]
            else:
                rid = self._match("DiagnosticReport", query)
                found = [self.store[("DiagnosticReport", rid)][-1]] if rid else []
            return httpx.Response(200, json={**searchset,
                                             "entry": [{"resource": r} for r in found]})
        return httpx.Response(200, json={**searchset, "entry": []})


class Named:
    """The rule baseline's answer under a model's method name and identity."""

    name = "clinragen-onnx"

    def __init__(self, model_id: str) -> None:
        self.inner, self.model_id = RuleBaseline(KG), model_id

    def predict(self, *args: Any) -> Prediction:
        p = self.inner.predict(*args)
        p.method, p.model_id = self.name, self.model_id
        return p


def run(server: VersionedServer, predictor: Any = None) -> Any:
    with FhirClient("http://127.0.0.1:9/fhir",
                    transport=httpx.MockTransport(batching(server.handler)),
                    retries=0) as client:
        return diagnose_patient(client, KG, predictor or RuleBaseline(KG), PID,
                                ReportSettings(audit_events=False))


def test_unchanged_writes_nothing_changed_writes_a_version() -> None:
    server = VersionedServer()
    first = run(server, Named("onnx:aaaa"))
    assert (first.status, first.version, first.model) == ("written", "1", "onnx:aaaa")
    request = server.transactions[0]["entry"][1]["request"]
    assert request == {"method": "PUT", "url": f"DiagnosticReport?identifier={SYSTEM}|"
                       f"{current_key(PID, 'clinragen-onnx')}"}
    assert run(server, Named("onnx:aaaa")).status == "exists"
    assert len(server.transactions) == 1  # nothing sent
    retrained = run(server, Named("onnx:bbbb"))
    assert (retrained.status, retrained.report_id, retrained.version) == (
        "written", first.report_id, "2")
    server.a1c = 5.0  # the cited reading corrected: the conclusion changes
    changed = run(server, Named("onnx:bbbb"))
    assert (changed.status, changed.version) == ("written", "3")
    assert len(server.current("DiagnosticReport")) == 1
    prov = server.transactions[-1]["entry"][2]["resource"]
    assert [e["what"]["reference"] for e in prov["entity"] if e["role"] == "revision"] == [
        f"DiagnosticReport/{first.report_id}/_history/2"]


def test_legacy_reports_are_adopted_and_linked_not_duplicated() -> None:
    server = VersionedServer()
    for n in ("7", "8"):
        server.put("DiagnosticReport", n, {
            "resourceType": "DiagnosticReport", "status": "preliminary",
            "subject": {"reference": f"Patient/{PID}"},
            "identifier": [{"system": SYSTEM, "value": n * 64}],
            "extension": [{"url": f"{EXT_BASE}/method",
                           "valueString": "knowledge-rule-baseline@1"}]})
    outcome = run(server)
    assert (outcome.status, outcome.report_id, outcome.version, outcome.superseded) == (
        "written", "7", "2", 2)  # the newest the server lists first: here the first stored
    entry = server.transactions[0]["entry"][1]
    assert entry["request"] == {"method": "PUT", "url": "DiagnosticReport/7"}
    assert [i["value"] for i in entry["resource"]["identifier"]] == [outcome.identifier, "7" * 64]
    assert any(e["url"] == FINGERPRINT_EXT for e in entry["resource"]["extension"])
    prov = server.transactions[0]["entry"][2]["resource"]
    assert sorted(e["what"]["reference"] for e in prov["entity"] if e["role"] == "revision") == [
        "DiagnosticReport/7/_history/1", "DiagnosticReport/8/_history/1"]
    assert len(server.current("DiagnosticReport")) == 2  # none added, none deleted
    assert run(server).status == "exists"


def test_list_values_of_a_mapping_are_repeated_parameters() -> None:
    """`audit --since/--until` searches `issued` twice (a list in a mapping): each item is its
    own parameter, as before the client took (name, value) pairs."""
    from clinragen_fhir.fhir.urls import param_pairs

    assert param_pairs({"issued": ["ge2025-01-01", "le2025-02-01"], "subject": "Patient/p"}) == [
        ("issued", "ge2025-01-01"), ("issued", "le2025-02-01"), ("subject", "Patient/p")]
    assert param_pairs([("date", "ge1"), ("date", "le2")]) == [("date", "ge1"), ("date", "le2")]
