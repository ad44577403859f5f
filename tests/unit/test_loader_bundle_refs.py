"""`load --types` on real Synthea transaction Bundles (issue 13, item 13).

The loader dropped the Encounters of a Synthea Bundle under `--types Patient,Observation,
DocumentReference` but kept the `urn:uuid:` references to them, so HAPI refused every bundle
(HAPI-0541: Unable to satisfy placeholder ID ... in element named 'encounter'). The fixture is a
trimmed real Synthea 3.3.0 bundle (tests/fixtures/synthea-bundle/README.md). The fake server
resolves references the way HAPI does in a transaction: a `urn:uuid:` must be an entry's
fullUrl, a conditional reference must match a stored or conditionally created resource.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.loader import as_idempotent, bundle_files, load, prepare_bundle

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "synthea-bundle"
KEEP = {"Patient", "Observation", "DocumentReference"}


def refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for v in value.values() for r in refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs(v)]
    return []


def hapi_like(stored: set[str], sent: list[dict[str, Any]]) -> FhirClient:
    """Refuses a transaction with an unresolvable placeholder or conditional reference."""
    def handler(request: httpx.Request) -> httpx.Response:
        bundle = json.loads(request.content)
        sent.append(bundle)
        urls = {e.get("fullUrl") for e in bundle["entry"]}
        created = {f"{e['request']['url']}?{e['request']['ifNoneExist']}"
                   for e in bundle["entry"] if e["request"].get("ifNoneExist")}
        for e in bundle["entry"]:
            for ref in refs(e["resource"]):
                unresolved = (ref.startswith("urn:uuid:") and ref not in urls) or (
                    "?" in ref and ref not in stored | created)
                if unresolved:
                    return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "processing",
                         "diagnostics": f"HAPI-0541: Unable to satisfy placeholder ID {ref}"}]})
        stored.update(created)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"})

    return FhirClient("http://127.0.0.1:1/fhir", transport=httpx.MockTransport(handler), retries=0)


def patient_bundle() -> dict[str, Any]:
    return json.loads((FIXTURE / "Maile198_Larson43_trimmed.json").read_text())  # type: ignore[no-any-return]


def test_the_fixture_is_a_synthea_bundle_with_urn_references_to_its_encounter() -> None:
    bundle = patient_bundle()
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert sorted(types) == sorted(["Patient", "Encounter", "Observation", "Observation",
                                    "DocumentReference"])
    encounter = next(e["fullUrl"] for e in bundle["entry"]
                     if e["resource"]["resourceType"] == "Encounter")
    assert encounter.startswith("urn:uuid:")
    assert sum(r == encounter for r in refs(bundle)) == 3  # 2 Observations, the note
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 30_000


def test_types_left_out_take_their_references_with_them() -> None:
    sent: list[dict[str, Any]] = []
    loaded = load(hapi_like(set(), sent), [FIXTURE], keep_types=KEEP, progress=False)
    assert not loaded.errors, loaded.errors
    assert loaded.counts == {"Observation": 2, "DocumentReference": 1, "Patient": 1}
    patient = sent[-1]  # support bundles first (left out whole), then the patient's
    assert bundle_files([FIXTURE])[-1].name.startswith("Maile198")
    sent = refs(patient)
    assert not any("Encounter" in r or r.startswith(("Practitioner?", "Organization?",
                                                     "Location?")) for r in sent)
    urls = {e["fullUrl"] for e in patient["entry"]}
    assert sent and all(r in urls for r in sent)  # what is left: the Patient, by urn:uuid
    doc = next(e["resource"] for e in patient["entry"]
               if e["resource"]["resourceType"] == "DocumentReference")
    assert "encounter" not in doc["context"] and doc["context"]["period"]  # the rest stays
    assert "author" not in doc and "custodian" not in doc
    # 3 to the Encounter, the note's author and custodian (support resources left out)
    assert loaded.stripped == 5


def test_without_types_or_with_everything_kept_nothing_is_removed() -> None:
    bundle = patient_bundle()
    out, stripped, dropped = prepare_bundle(bundle)
    assert stripped == 0 and dropped == set()
    assert refs(out) == refs(bundle)
    assert refs(as_idempotent(bundle, KEEP | {"Encounter"})) == refs(bundle)
    sent: list[dict[str, Any]] = []
    report = load(hapi_like(set(), sent), [FIXTURE], progress=False)
    assert not report.errors and report.counts["Encounter"] == 1 and report.stripped == 0


def test_a_support_type_that_is_loaded_keeps_its_references() -> None:
    """Practitioner kept: the note's author reference stays and resolves."""
    sent: list[dict[str, Any]] = []
    report = load(hapi_like(set(), sent), [FIXTURE], keep_types=KEEP | {"Practitioner"},
                  progress=False)
    assert not report.errors, report.errors
    doc = next(e["resource"] for e in sent[-1]["entry"]
               if e["resource"]["resourceType"] == "DocumentReference")
    assert doc["author"][0]["reference"].startswith("Practitioner?identifier=")
    assert "custodian" not in doc
