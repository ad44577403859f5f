"""Audit: AuditEvent shape and the pure re-check of a report's cited inputs."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.errors import FhirHTTPError, FhirUnavailable
from clinragen_fhir.report.audit import APP_DEVICE, audit_bundle, audit_event
from clinragen_fhir.report.build import build_transaction
from clinragen_fhir.report.recheck import (
    Change,
    Cited,
    ReportAudit,
    cited_inputs,
    compare,
    quantity_of,
    write_csv,
)
from tests.unit.test_report_html import USED, labs, prediction

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def obs(oid: str, version: str, value: float, unit: str = "%", loinc: str = "4548-4",
        status: str = "final") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "meta": {"versionId": version},
            "status": status, "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "valueQuantity": {"value": value, "unit": unit, "code": unit}}


def report_and_provenance() -> tuple[dict[str, Any], dict[str, Any]]:
    bundle, _ = build_transaction("p1", prediction(), USED, [], ReportSettings(), now=NOW,
                                  labs=labs())
    return bundle["entry"][1]["resource"], bundle["entry"][2]["resource"]


def current_as_cited() -> dict[str, Any]:
    return {"Observation/a2": obs("a2", "2", 7.1), "Observation/a1": obs("a1", "2", 6.6),
            "Observation/g1": obs("g1", "1", 8.2, "mmol/L", "2345-7"),
            "DocumentReference/d1": {"resourceType": "DocumentReference", "id": "d1",
                                     "meta": {"versionId": "1"}, "content": []}}


def test_cited_inputs_come_from_provenance_and_cited_value_extensions() -> None:
    report, prov = report_and_provenance()
    prov["entity"].append({"role": "source", "what": {"reference": "Observation/bad"},
                           "extension": [{"url": "x/skip-reason", "valueString": "no value"}]})
    cited = cited_inputs(report, prov)
    inputs = [(c.reference, c.version) for c in cited if c.value is None]
    assert inputs == [("Observation/a2", "2"), ("Observation/a1", "2"), ("Observation/g1", "1"),
                      ("DocumentReference/d1", "1")]  # the skipped input is not an input
    values = [(c.reference, c.value, c.unit) for c in cited if c.value is not None]
    assert values == [("Observation/a2", 7.1, "%"), ("Observation/a1", 6.6, "%"),
                      ("Observation/g1", 8.2, "mmol/L")]


def test_unchanged_inputs_give_no_change() -> None:
    report, prov = report_and_provenance()
    assert compare(cited_inputs(report, prov), current_as_cited(), {}) == []


def test_new_version_with_the_same_value_is_only_a_new_version() -> None:
    report, prov = report_and_provenance()
    current = current_as_cited()
    current["Observation/a2"] = obs("a2", "3", 7.1)
    changes = compare(cited_inputs(report, prov), current,
                      {"Observation/a2/_history/2": obs("a2", "2", 7.1)})
    assert [(c.kind, c.reference, c.detail) for c in changes] == [
        ("new-version", "Observation/a2", "v2 -> v3")]


def test_changed_value_deleted_and_expunged_inputs_are_flagged() -> None:
    report, prov = report_and_provenance()
    current = current_as_cited()
    current["Observation/a2"] = obs("a2", "3", 6.1)  # corrected downwards
    del current["Observation/a1"]  # deleted since
    current["Observation/g1"] = obs("g1", "4", 8.2, "mmol/L", "2345-7")  # old version expunged
    historic = {"Observation/a2/_history/2": obs("a2", "2", 7.1),
                "Observation/g1/_history/1": None}
    kinds = {(c.kind, c.reference) for c in compare(cited_inputs(report, prov), current,
                                                    historic)}
    assert kinds == {("new-version", "Observation/a2"), ("value-changed", "Observation/a2"),
                     ("deleted", "Observation/a1"), ("new-version", "Observation/g1"),
                     ("cited-version-unreadable", "Observation/g1")}
    detail = next(c.detail for c in compare(cited_inputs(report, prov), current, historic)
                  if c.kind == "value-changed")
    assert detail == "7.1 % -> 6.1 %"


def test_a_report_that_misquotes_its_source_is_flagged() -> None:
    report, prov = report_and_provenance()
    current = current_as_cited()
    current["Observation/a1"] = obs("a1", "2", 6.9)  # same version, other value than cited
    changes = compare(cited_inputs(report, prov), current, {})
    assert [(c.kind, c.reference) for c in changes] == [
        ("cited-value-mismatch", "Observation/a1")]


def test_an_uncited_value_change_is_found_by_comparing_versions() -> None:
    cited = [Cited("Observation/x", "1")]  # an older report: Provenance only, no cited values
    changes = compare(cited, {"Observation/x": obs("x", "2", 5.0, status="amended")},
                      {"Observation/x/_history/1": obs("x", "1", 5.0)})
    assert [c.kind for c in changes] == ["new-version", "value-changed"]
    same = compare(cited, {"Observation/x": obs("x", "2", 5.0)},
                   {"Observation/x/_history/1": obs("x", "1", 5.0)})
    assert [c.kind for c in same] == ["new-version"]


def test_component_values_are_read_by_loinc() -> None:
    bp = {"resourceType": "Observation", "code": {"coding": [{"code": "85354-9"}]},
          "component": [
              {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 150,
                                                                           "unit": "mm[Hg]"}},
              {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": {"value": 95,
                                                                           "unit": "mm[Hg]"}}]}
    assert quantity_of(bp, "8462-4") == (95.0, "mm[Hg]")
    assert quantity_of(bp, "8480-6") == (150.0, "mm[Hg]")
    assert quantity_of(bp, "0000-0") is None
    assert quantity_of(None) is None


def test_audit_events_name_our_device_the_patient_and_the_outcome() -> None:
    ok = audit_event("R", "p1", interactions=["read", "search-type"],
                     details={"Observation read": 12}, now=NOW)
    refused = audit_event("C", "p1", interactions=["transaction"],
                          error=FhirHTTPError(422, "POST", "", "bad"))
    down = audit_event("C", "p1", interactions=["transaction"], error=FhirUnavailable("x"))
    assert (ok["outcome"], refused["outcome"], down["outcome"]) == ("0", "4", "8")
    assert refused["outcomeDesc"] == "FhirHTTPError"  # the class, never the message
    assert ok["entity"][0]["what"] == {"reference": "Patient/p1"}
    assert ok["entity"][0]["detail"] == [{"type": "Observation read", "valueString": "12"}]
    bundle = audit_bundle([ok, refused])
    device, *events = bundle["entry"]
    assert device["request"]["ifNoneExist"].endswith(f"|{APP_DEVICE}")
    for e in events:
        assert e["resource"]["agent"][0]["who"]["reference"] == device["fullUrl"]
        assert e["resource"]["agent"][0]["requestor"] is True
        assert e["resource"]["source"]["observer"]["reference"] == device["fullUrl"]
    # The R4 model accepts them (required elements present, codes in the right places).
    from fhir.resources.R4B.auditevent import AuditEvent

    AuditEvent.model_validate({**ok, "agent": [{**ok["agent"][0],
                                                "who": {"reference": "Device/d1"}}],
                               "source": {**ok["source"],
                                          "observer": {"reference": "Device/d1"}}})


def test_csv_has_one_row_per_report() -> None:
    audits = [ReportAudit("r1", "p1", "2025-01-02", "m@1", "kg", ["44054006"], 3, 2,
                          [Change("Observation/a", "2", "value-changed", "7.1 % -> 6.1 %")]),
              ReportAudit("r2", "p2", "2025-01-03", "m@1", "kg", [], 1, 0)]
    out = io.StringIO()
    assert write_csv(audits, out) == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["status"] for r in rows] == ["inputs-changed", "unchanged"]
    assert rows[0]["changes"] == "value-changed Observation/a/_history/2: 7.1 % -> 6.1 %"
    assert rows[0]["report"] == "DiagnosticReport/r1" and rows[0]["cited_values"] == "2"



def test_change_details_write_values_with_the_project_number_format() -> None:
    cited = [Cited("Observation/x", "1", "4548-4", 1_000_000.0, "/uL"),
             Cited("Observation/y", "1", "4548-4", 0.00001234, "%")]
    current = {"Observation/x": obs("x", "2", 1_200_000.0, "/uL"),
               "Observation/y": obs("y", "1", 0.5)}
    historic = {"Observation/x/_history/1": obs("x", "1", 1_000_000.0, "/uL")}
    details = {(c.kind, c.reference): c.detail for c in compare(cited, current, historic)}
    assert details[("value-changed", "Observation/x")] == "1000000 /uL -> 1200000 /uL"
    assert details[("cited-value-mismatch", "Observation/y")] == (
        "report cites 0.0000123 %, version 1 has 0.5 %")
    assert not any("e+" in d or "e-" in d for d in details.values())
