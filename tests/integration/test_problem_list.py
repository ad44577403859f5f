"""Known vs suspected on real HAPI (issue 14, item 4).

A synthetic patient with high HbA1c readings is diagnosed with the problem-list check on: with no
Condition the concluded diabetes is "suspected, not on the problem list"; once an active
Condition for it is written, the next run writes a new version of the same report in which it is
"known (on the problem list since ...)": in the conclusionCode's extension, the HTML page and the
narrative, and the Condition is a source of the version's Provenance. The stored report passes
HAPI's `$validate` with the project's StructureDefinitions loaded.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.conditions import ENV
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import Outcome, diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.report.build import EXT_BASE
from clinragen_fhir.report.problem_list import read_extension
from tests.integration.hospital import cli, new_patient  # noqa: F401 - fixture
from tests.integration.test_conformance import known_gap, validate

pytestmark = pytest.mark.integration
NewPatient = Callable[[list[tuple[float, int]]], str]
KG = load_graph()
SETTINGS = ReportSettings()
T2DM = "44054006"


def run(fhir: FhirClient, pid: str) -> Outcome:
    return diagnose_patient(fhir, KG, RuleBaseline(KG), pid, SETTINGS)


def stored(fhir: FhirClient, outcome: Outcome) -> dict[str, Any]:
    return fhir.read("DiagnosticReport", outcome.report_id)


def page(report: dict[str, Any]) -> str:
    html = next(base64.b64decode(f["data"]).decode() for f in report["presentedForm"]
                if f["contentType"].startswith("text/html"))
    return html.replace("&#x27;", "'")


def test_a_condition_on_the_list_turns_suspected_into_known(
        fhir: FhirClient, new_patient: NewPatient, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    monkeypatch.setenv(ENV, "on")
    done = cli("install-profiles")
    assert done.returncode == 0, done.stderr
    pid = new_patient([(6.9, 300), (7.6, 90), (8.2, 20)])

    first = run(fhir, pid)
    assert first.status == "written" and T2DM in first.diagnoses, first
    report = stored(fhir, first)
    codes = {cc["coding"][0]["code"]: read_extension(cc) for cc in report["conclusionCode"]}
    assert codes[T2DM]["status"] == "suspected", codes
    assert "Suspected, not on the problem list" in page(report)
    assert first.problem_list.get("suspected", 0) >= 1 and "known" not in first.problem_list

    # the clinician puts it on the problem list; a resolved one of the same code is ignored
    for cid, status in ((f"{pid}-dm", "active"), (f"{pid}-old", "resolved")):
        fhir.update({
            "resourceType": "Condition", "id": cid,
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": status}]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed"}]},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": SNOMED, "code": T2DM,
                                 "display": "Diabetes mellitus type 2"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "onsetDateTime": "2018-05-06" if status == "active" else "2001-01-01"})

    second = run(fhir, pid)
    assert second.status == "written" and second.report_id == first.report_id, second
    assert second.version == "2"  # the same current report, a new version
    assert second.problem_list.get("known") == 1, second.problem_list
    report = stored(fhir, second)
    codes = {cc["coding"][0]["code"]: read_extension(cc) for cc in report["conclusionCode"]}
    known = codes[T2DM]
    assert known["status"] == "known" and known["since"] == "2018-05-06", known
    assert known["condition"].startswith(f"Condition/{pid}-dm"), known
    assert all(s["status"] == "suspected" for c, s in codes.items() if c != T2DM), codes
    html = page(report)
    assert "Known (on the problem list)" in html and "since 2018-05-06" in html
    assert "Known (on the problem list)" in report["text"]["div"]
    provenance = next(iter(fhir.search("Provenance", {
        "target": f"DiagnosticReport/{report['id']}", "_sort": "-_lastUpdated"})))
    assert any(str(e["what"].get("reference", "")).startswith(f"Condition/{pid}-dm")
               for e in provenance["entity"]), provenance["entity"]

    # unchanged list, unchanged inputs: nothing written, also through the operator's CLI
    assert run(fhir, pid).status == "exists"
    done = cli("diagnose", pid, "--local", CLINRAGEN_REPORT__PROBLEM_LIST="on")
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert (again["status"], again["problem_list"]) == ("exists", second.problem_list), again

    bad = [(i["severity"], i.get("diagnostics"), i.get("expression")) for r in (report,
                                                                              provenance)
           for i in validate(r)
           if (i["severity"] in ("error", "fatal") and not known_gap(i))
           or ("Unknown extension" in str(i.get("diagnostics", ""))
               and EXT_BASE in str(i.get("diagnostics", "")))]
    assert not bad, bad

    # the check turned off: the next run reads no Condition and says "not checked", a new
    # version (what the report says changed), never "suspected"
    done = cli("diagnose", pid, "--local", CLINRAGEN_REPORT__PROBLEM_LIST="off")
    assert done.returncode == 0, done.stderr
    off = json.loads(done.stdout)
    assert off["status"] == "written" and off["version"] == "3", off
    assert set(off["problem_list"]) == {"not-checked"}, off
    report = fhir.read("DiagnosticReport", off["report_id"])
    assert {read_extension(cc)["status"] for cc in report["conclusionCode"]} == {"not-checked"}
    assert "Problem list not checked" in page(report)
    assert "Suspected, not on the problem list" not in page(report)
