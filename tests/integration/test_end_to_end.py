"""End to end on real parts: HAPI FHIR -> real Celery worker -> DiagnosticReport + Provenance."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from tests.integration.conftest import worker_env

pytestmark = pytest.mark.integration
SYSTEM = ReportSettings().identifier_system


def our_reports(fhir: FhirClient, pid: str) -> list[dict[str, Any]]:
    return list(fhir.search("DiagnosticReport", {"subject": f"Patient/{pid}",
                                                 "identifier": f"{SYSTEM}|"}))


def delete_reports(fhir: FhirClient, pid: str) -> None:
    """Remove earlier runs' reports (with their Provenance and AuditEvents): write afresh."""
    for report in our_reports(fhir, pid):
        fhir.delete("DiagnosticReport", report["id"], cascade=True)


def run_all(pids: list[str]) -> list[dict[str, Any]]:
    from clinragen_fhir.worker.tasks import diagnose

    results = [diagnose.delay(pid) for pid in pids]
    return [r.get(timeout=300) for r in results]


def test_worker_writes_one_report_per_patient_and_input_version(
        fhir: FhirClient, loaded: list[str], worker: subprocess.Popen[bytes]) -> None:
    for pid in loaded:
        delete_reports(fhir, pid)
    first = run_all(loaded)
    assert [o["status"] for o in first] == ["written"] * len(loaded), first
    for pid, outcome in zip(loaded, first, strict=True):
        reports = our_reports(fhir, pid)
        assert len(reports) == 1
        report = reports[0]
        assert report["id"] == outcome["report_id"]
        assert report["status"] == "preliminary"
        assert report["identifier"][0]["value"] == outcome["identifier"]
        assert report["conclusion"]
        codes = [c["code"] for cc in report.get("conclusionCode", []) for c in cc["coding"]]
        assert codes == outcome["diagnoses"]
        # Every result reference resolves to an Observation of this patient.
        for ref in report.get("result", []):
            rtype, rid = ref["reference"].split("/")[:2]  # versioned: Type/id/_history/n
            obs = fhir.read(rtype, rid)
            assert obs["subject"]["reference"] == f"Patient/{pid}"
        provs = list(fhir.search("Provenance", {"target": f"DiagnosticReport/{report['id']}"}))
        assert len(provs) == 1
        entities = [e["what"]["reference"] for e in provs[0]["entity"]]
        assert len(entities) >= outcome["n_labs"] > 0 or outcome["n_notes"] > 0
        used = [e for e in provs[0]["entity"] if "extension" not in e]
        assert all("/_history/" in e["what"]["reference"] for e in used)
        device = fhir.read(*provs[0]["agent"][0]["who"]["reference"].split("/")[:2])
        assert device["identifier"][0]["value"].startswith(outcome["method"])
    # Run again: nothing new is written, still exactly one report per patient.
    second = run_all(loaded)
    assert [o["status"] for o in second] == ["exists"] * len(loaded)
    assert [o["identifier"] for o in second] == [o["identifier"] for o in first]
    for pid in loaded:
        assert len(our_reports(fhir, pid)) == 1


def test_new_input_version_gives_a_new_version_only_when_cited(
        fhir: FhirClient, loaded: list[str], worker: subprocess.Popen[bytes]) -> None:
    """The report lifecycle changed this expectation: a new version of any input used to give a
    second report (the key hashed every input version). Now there is one current report per
    patient and method; an input that is not cited changes nothing and writes nothing, and a
    new version of a cited reading (the evidence changed) is a new version of that report."""
    pid = loaded[0]
    before = run_all([pid])[0]
    report = fhir.read("DiagnosticReport", before["report_id"])
    cited = {p["valueString"].split("/_history/")[0] for e in report.get("extension", [])
             if e["url"].endswith("/cited-value") for p in e["extension"]
             if p["url"] == "source"}
    labs = list(fhir.search("Observation", {"patient": pid, "category": "laboratory"}))
    uncited = next((o for o in labs if f"Observation/{o['id']}" not in cited), None)
    if uncited is not None:
        uncited.setdefault("note", []).append({"text": "re-verified"})
        fhir.update(uncited)
        unchanged = run_all([pid])[0]
        assert unchanged["status"] == "exists" and unchanged["version"] == before["version"]
    if cited:
        obs = fhir.read("Observation", sorted(cited)[0].split("/")[1])
        obs.setdefault("note", []).append({"text": "re-verified"})
        fhir.update(obs)
        after = run_all([pid])[0]
        assert after["status"] == "written" and after["identifier"] == before["identifier"]
        assert after["report_id"] == before["report_id"]
        assert int(after["version"]) == int(report["meta"]["versionId"]) + 1
    assert len(our_reports(fhir, pid)) == 1


def test_server_down_fails_visibly_after_bounded_retries(tmp_path: Any) -> None:
    env = worker_env(CLINRAGEN_FHIR__BASE_URL="http://127.0.0.1:9/fhir",
                     CLINRAGEN_FHIR__RETRIES="1")
    proc = subprocess.run([sys.executable, "-m", "clinragen_fhir.cli", "diagnose", "--local",
                           "some-patient"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "FhirUnavailable" in proc.stderr or "FhirUnavailable" in proc.stdout
    assert "some-patient" not in proc.stderr + proc.stdout
