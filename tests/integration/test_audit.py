"""Audit on real HAPI: AuditEvents per read and write batch, and `clinragen-fhir audit` flagging
reports whose cited inputs changed since they were written (re-check + CSV export)."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirHTTPError
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.report.audit import APP_DEVICE
from tests.integration.hospital import cli, new_patient  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
NewPatient = Callable[[list[tuple[float, int]]], str]


def audit_events(fhir: FhirClient, pid: str) -> list[dict[str, Any]]:
    return list(fhir.search("AuditEvent", {"entity": f"Patient/{pid}"}))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_audit_events_and_recheck_flag_changed_inputs(
        fhir: FhirClient, new_patient: NewPatient, tmp_path: Path) -> None:  # noqa: F811
    pid = new_patient([(6.0, 700), (6.9, 300), (7.4, 30)])
    kg = load_graph()
    outcome = diagnose_patient(fhir, kg, RuleBaseline(kg), pid, ReportSettings())
    assert outcome.status == "written" and "44054006" in outcome.diagnoses, outcome

    # One AuditEvent for the read batch, one for the write, both naming our Device.
    events = audit_events(fhir, pid)
    assert sorted(e["action"] for e in events) == ["C", "R"]
    assert {e["outcome"] for e in events} == {"0"}
    device = fhir.read(*events[0]["agent"][0]["who"]["reference"].split("/")[:2])
    assert device["identifier"][0]["value"] == APP_DEVICE
    write = next(e for e in events if e["action"] == "C")
    assert {"type": "DiagnosticReport", "identifier": {
        "system": ReportSettings().identifier_system, "value": outcome.identifier}} in [
        x["what"] for x in write["entity"]]
    read = next(e for e in events if e["action"] == "R")
    details = {d["type"]: d["valueString"] for d in read["entity"][0]["detail"]}
    assert details["Observation read"] == "3"
    # The write is referenced by identifier, so the report stays deletable (HAPI enforces
    # referential integrity on delete); writing it again adds a second pair of events.
    for prov in fhir.search("Provenance", {"target": f"DiagnosticReport/{outcome.report_id}"}):
        _delete(fhir, "Provenance", prov["id"])
    _delete(fhir, "DiagnosticReport", outcome.report_id)
    outcome = diagnose_patient(fhir, kg, RuleBaseline(kg), pid, ReportSettings())
    assert outcome.status == "written"
    assert sorted(e["action"] for e in audit_events(fhir, pid)) == ["C", "C", "R", "R"]

    # Nothing changed yet.
    first = tmp_path / "first.csv"
    done = cli("audit", "--patient", pid, "--csv", str(first))
    assert done.returncode == 0, done.stderr
    rows = read_csv(first)
    assert [(r["report"], r["status"]) for r in rows] == [
        (f"DiagnosticReport/{outcome.report_id}", "unchanged")]
    assert rows[0]["inputs"] == "3" and int(rows[0]["cited_values"]) >= 1
    assert rows[0]["diagnoses"] == " ".join(outcome.diagnoses)

    # The newest HbA1c is corrected; an older one gets a new version with the same value.
    newest, older = fhir.read("Observation", f"{pid}-a1c-2"), fhir.read("Observation",
                                                                       f"{pid}-a1c-1")
    newest["valueQuantity"]["value"] = 6.1
    newest["status"] = "corrected"
    older.setdefault("note", []).append({"text": "re-verified"})
    fhir.update(newest)
    fhir.update(older)

    second = tmp_path / "second.csv"
    done = cli("audit", "--patient", pid, "--csv", str(second))
    assert done.returncode == 0, done.stderr
    assert "inputs-changed" in done.stdout and "1 with changed inputs" in done.stdout
    row = read_csv(second)[0]
    assert row["status"] == "inputs-changed"
    changes = row["changes"].split("; ")
    assert f"new-version Observation/{pid}-a1c-2/_history/1: v1 -> v2" in changes
    assert f"value-changed Observation/{pid}-a1c-2/_history/1: 7.4 % -> 6.1 %" in changes
    assert f"new-version Observation/{pid}-a1c-1/_history/1: v1 -> v2" in changes
    assert not [c for c in changes if "a1c-1" in c and "value-changed" in c]
    assert not [c for c in changes if "a1c-0" in c]  # untouched input: not flagged

    # Filters: method/version, date range.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    by_method = cli("audit", "--patient", pid, "--method", "knowledge-rule-baseline",
                    "--no-recheck")
    assert "1 reports" in by_method.stdout, by_method.stdout + by_method.stderr
    assert "0 reports" in cli("audit", "--patient", pid, "--method", "no-such-model",
                              "--no-recheck").stdout
    assert "0 reports" in cli("audit", "--patient", pid, "--since", tomorrow).stdout
    assert "1 reports" in cli("audit", "--patient", pid, "--until", tomorrow,
                              "--no-recheck").stdout


def test_audit_events_can_be_turned_off(fhir: FhirClient,
                                        new_patient: NewPatient) -> None:  # noqa: F811
    pid = new_patient([(7.2, 20)])
    done = cli("diagnose", "--local", pid, CLINRAGEN_REPORT__AUDIT_EVENTS="false")
    assert done.returncode == 0, done.stderr
    assert '"status": "written"' in done.stdout
    assert audit_events(fhir, pid) == []


def _delete(fhir: FhirClient, resource_type: str, resource_id: str) -> None:
    """Test set-up: a delete right after the write can meet HAPI's optimistic lock on the same
    resource (409 HAPI-0550 "version constraint failure", once in CI); a few tries, then fail."""
    for attempt in range(5):
        try:
            fhir.delete(resource_type, resource_id)
            return
        except FhirHTTPError as exc:
            if exc.status != 409 or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
