"""Conformance of what is written (issue 14, item 2): cited results only, versioned; the site's
Organization as performer and onBehalfOf; the AIAST label; probabilities as an extension the
project defines; a StructureDefinition for every extension written; BALP-shaped AuditEvents.
HAPI's `$validate` of the real thing: tests/integration/test_conformance.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.structuredefinition import StructureDefinition

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.logs import hash_id
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction, Withheld
from clinragen_fhir.report import profiles
from clinragen_fhir.report.audit import PURPOSE_OF_USE, audit_event
from clinragen_fhir.report.build import (
    AI_ASSERTED,
    EXT_BASE,
    PROFILE,
    InputRef,
    build_transaction,
    site_organization,
)
from tests.fhir_batch import batching
from tests.observations import a1c

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
SITE = ReportSettings(organization_reference="Organization/site-1",
                      organization_identifier="urn:oid:2.16.840.1.113883.3.999|4711",
                      organization_name="General Hospital")


def prediction() -> Prediction:
    a = Evidence("Observation/o1", "2", "4548-4", "HbA1c", 7.1, "%", "2024-03-02T00:00:00+00:00",
                 "HbA1c 7.1 % on 2024-03-02")
    b = Evidence("Observation/o2", "5", "2345-7", "Glucose", 150.0, "mg/dL",
                 "2024-03-02T00:00:00+00:00", "Glucose 150 mg/dL on 2024-03-02")
    return Prediction("knowledge-rule-baseline", "1", "kg-abc",
                      [Diagnosis("44054006", "Diabetes mellitus type 2", 0.9, (a, b)),
                       Diagnosis("73211009", "Diabetes mellitus", 0.61234567, (a,))],
                      "HbA1c was 7.1 % on 2024-03-02 (>= 6.5 %).")


USED = [InputRef("Observation/o1", "2"), InputRef("Observation/o2", "5"),
        InputRef("Observation/uncited", "1"), InputRef("DocumentReference/d1", "1")]


def written(settings: ReportSettings = SITE) -> tuple[dict[str, Any], dict[str, Any]]:
    bundle, _ = build_transaction("p1", prediction(), USED, [], settings, now=NOW)
    by_type = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    return by_type["DiagnosticReport"], by_type["Provenance"]


def test_result_holds_only_the_cited_observations_by_versioned_reference() -> None:
    report, prov = written()
    assert report["result"] == [{"reference": "Observation/o1/_history/2"},
                                {"reference": "Observation/o2/_history/5"}]
    # every input read and used is still in the Provenance
    assert "Observation/uncited/_history/1" in [e["what"]["reference"] for e in prov["entity"]]


def test_performer_and_on_behalf_of_name_the_configured_site_organization() -> None:
    report, prov = written()
    site = {"type": "Organization", "reference": "Organization/site-1",
            "identifier": {"system": "urn:oid:2.16.840.1.113883.3.999", "value": "4711"},
            "display": "General Hospital"}
    assert report["performer"] == [site]
    author = prov["agent"][0]
    assert author["type"]["coding"][0]["code"] == "author"
    assert author["who"]["reference"].startswith("urn:uuid:")  # the method Device
    assert author["onBehalfOf"] == site  # provenance-1: a Device agent needs onBehalfOf


def test_unconfigured_site_is_an_identifier_only_reference() -> None:
    report, prov = written(ReportSettings())
    fallback = {"type": "Organization",
                "identifier": {"system": "urn:clinragen-fhir:site", "value": "unconfigured"}}
    assert report["performer"] == [fallback] == [prov["agent"][0]["onBehalfOf"]]
    only_id = site_organization(ReportSettings(organization_identifier="urn:x|1"))
    assert only_id == {"type": "Organization", "identifier": {"system": "urn:x", "value": "1"}}


@pytest.mark.parametrize("bad", [{"organization_reference": "Patient/1"},
                                 {"organization_reference": "Organization/a b"},
                                 {"organization_identifier": "no-bar"}])
def test_malformed_organization_settings_are_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        ReportSettings(**bad)


def test_ai_label_profile_and_probabilities() -> None:
    report, prov = written()
    assert report["meta"] == {"profile": [PROFILE], "security": [AI_ASSERTED]}
    assert AI_ASSERTED == {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                           "code": "AIAST", "display": "Artificial Intelligence asserted"}
    assert prov["meta"]["security"] == [AI_ASSERTED]
    probs = [(cc["coding"][0]["code"], cc["extension"]) for cc in report["conclusionCode"]]
    assert probs == [
        ("44054006", [{"url": f"{EXT_BASE}/probability", "valueDecimal": 0.9}]),
        ("73211009", [{"url": f"{EXT_BASE}/probability", "valueDecimal": 0.6123}])]
    # the R4 models accept them (Device references replaced by literal ones)
    DiagnosticReport.model_validate(report)
    prov = json.loads(json.dumps(prov).replace("urn:uuid:", "Device/u-"))
    Provenance.model_validate(prov)


def _urls(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {str(node["url"])} if isinstance(node.get("url"), str) else set()
        return found.union(*(_urls(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_urls(v) for v in node))
    return set()


def test_every_extension_written_has_a_shipped_structure_definition() -> None:
    defined = profiles.defined_urls()
    assert PROFILE in defined
    pred = dataclasses.replace(prediction(), withheld=[Withheld("38341003", "HTN", 0.97)])
    bundle, _ = build_transaction("p1", pred, USED, [], SITE, now=NOW)
    event = audit_event("R", "p1", interactions=["read"], organization=site_organization(SITE),
                        server="http://fhir.example/fhir",
                        queries=[("Observation", {"patient": "p1"})])
    written_urls = {u for u in _urls([bundle, event]) if u.startswith(EXT_BASE)}
    assert written_urls and written_urls <= defined, written_urls - defined
    # and every extension URL named in the source (even on paths this build did not take)
    named: set[str] = set()
    for src in (ROOT / "clinragen_fhir").rglob("*.py"):
        text = src.read_text()
        named |= {f"{EXT_BASE}/{n}" for n in re.findall(r'EXT_BASE\}/([a-z0-9-]+)', text)}
        named |= {u for u in re.findall(r'"(https://clinragen-fhir\.org/StructureDefinition/'
                                        r'[a-z0-9-]+)"', text)}
    assert named <= defined, named - defined
    for sd in profiles.structure_definitions():
        StructureDefinition.model_validate(sd)
        assert sd["url"] == f"{EXT_BASE}/{sd['id']}" and sd["fhirVersion"] == "4.0.1"
        if sd["type"] == "Extension":
            fixed = [e["fixedUri"] for e in sd["differential"]["element"]
                     if e["path"] == "Extension.url"]
            assert fixed == [sd["url"]]


def test_profiles_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]["clinragen_fhir.report"]
    assert "profiles/*.json" in data
    assert profiles.PROFILE_DIR.parent == Path(profiles.__file__).parent


def test_install_puts_each_definition_by_id() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(200, json=json.loads(request.content))

    with FhirClient("http://127.0.0.1:9/fhir", transport=httpx.MockTransport(handler)) as c:
        urls = profiles.install(c)
    assert sorted(urls) == sorted(profiles.defined_urls())
    assert seen == [("PUT", f"/fhir/StructureDefinition/{sd['id']}")
                    for sd in profiles.structure_definitions()]


def test_audit_events_have_the_balp_shape_without_the_patient_id_in_clear() -> None:
    org = site_organization(SITE)
    ev = audit_event("R", "p-secret-42", interactions=["read", "search-type"],
                     organization=org, server="https://fhir.example.org/fhir",
                     queries=[("Observation", {"patient": "p-secret-42",
                                               "category": "laboratory,vital-signs",
                                               "date": "ge2022-01-01"})], now=NOW)
    client, site, server = ev["agent"]
    assert client["type"]["coding"][0]["code"] == "110153" and client["requestor"] is True
    assert client["purposeOfUse"] == site["purposeOfUse"] == PURPOSE_OF_USE
    assert PURPOSE_OF_USE[0]["coding"][0]["code"] == "TREAT"
    assert site["who"] == org and site["requestor"] is False
    assert server["type"]["coding"][0]["code"] == "110152" and server["requestor"] is False
    assert server["network"] == {"address": "fhir.example.org", "type": "1"}
    patient, query = ev["entity"]
    assert patient["what"] == {"reference": "Patient/p-secret-42"}
    assert (query["type"]["code"], query["role"]["code"]) == ("2", "24")
    text = base64.b64decode(query["query"]).decode()
    assert text == (f"Observation?patient={hash_id('p-secret-42')}"
                    "&category=laboratory,vital-signs&date=ge2022-01-01")
    assert "p-secret-42" not in text
    AuditEvent.model_validate(json.loads(json.dumps(ev).replace('"reference": ""',
                                                                '"reference": "Device/d"')))


def test_pipeline_audits_its_searches_and_the_site() -> None:
    """The read event of a real pipeline run names both searches as sent and the site."""
    pid = "p-conf-1"
    posted: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        if request.method == "POST" and path == "":
            bundle = json.loads(request.content)
            posted.append(bundle)
            return httpx.Response(200, json={"resourceType": "Bundle",
                                             "type": "transaction-response", "entry": [
                {"response": {"status": "201 Created",
                              "location": f"{e['resource']['resourceType']}/x{i}/_history/1"}}
                for i, e in enumerate(bundle["entry"])]})
        if path == f"Patient/{pid}":
            return httpx.Response(200, json={"resourceType": "Patient", "id": pid,
                                             "gender": "female", "birthDate": "1960-01-01"})
        found = [{**a1c(pid, v, d, f"o{i}"), "meta": {"versionId": "1"}}
                 for i, (v, d) in enumerate(((6.9, 400), (8.1, 20)))] \
            if path == "Observation" else []
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r} for r in found]})

    kg = load_graph(None)
    with FhirClient("http://127.0.0.1:9/fhir",
                    transport=httpx.MockTransport(batching(handler))) as c:
        outcome = diagnose_patient(c, kg, RuleBaseline(kg), pid, SITE)
    assert outcome.status == "written"
    events = [e["resource"] for b in posted for e in b["entry"]
              if e["resource"]["resourceType"] == "AuditEvent"]
    read = next(e for e in events if e["action"] == "R")
    queries = [base64.b64decode(x["query"]).decode() for x in read["entity"] if "query" in x]
    assert [q.split("?")[0] for q in queries] == ["Observation", "DocumentReference"]
    assert all(pid not in q and f"patient={hash_id(pid)}" in q for q in queries)
    for ev in events:
        assert ev["agent"][1]["who"] == site_organization(SITE)
        assert ev["agent"][2]["who"]["identifier"]["value"] == "http://127.0.0.1:9/fhir"
    report = next(e["resource"] for b in posted for e in b["entry"]
                  if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["result"] and all("/_history/" in r["reference"] for r in report["result"])
