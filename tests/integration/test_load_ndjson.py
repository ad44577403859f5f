"""`clinragen-fhir load` of a Bulk Data NDJSON folder into real HAPI, which enforces references.

The folder is shaped like a clinosim export: Encounter.diagnosis -> Condition and
Condition.encounter -> Encounter (a cycle across types), Observations that reference the
Encounter and a Practitioner. Loading type by type is refused by HAPI (HTTP 400); the loader
puts each patient's compartment in one transaction after the shared resources.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirHTTPError
from clinragen_fhir.fhir.loader import load

pytestmark = pytest.mark.integration


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def export(folder: Path, run: str) -> list[dict[str, Any]]:
    org, dr = f"org-{run}", f"dr-{run}"
    resources: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": org, "name": "Test hospital"},
        {"resourceType": "Practitioner", "id": dr}]
    for i in range(3):
        pid, enc, cond = f"pt-{run}-{i}", f"enc-{run}-{i}", f"cond-{run}-{i}"
        code = {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}
        resources += [
            {"resourceType": "Patient", "id": pid, "gender": "female",
             "managingOrganization": ref(f"Organization/{org}")},
            {"resourceType": "Encounter", "id": enc, "status": "finished",
             "class": {"code": "AMB"}, "subject": ref(f"Patient/{pid}"),
             "diagnosis": [{"condition": ref(f"Condition/{cond}"), "rank": 1}],
             "serviceProvider": ref(f"Organization/{org}")},
            {"resourceType": "Condition", "id": cond, "code": code,
             "subject": ref(f"Patient/{pid}"), "encounter": ref(f"Encounter/{enc}"),
             "recorder": ref(f"Practitioner/{dr}")},
            {"resourceType": "Observation", "id": f"obs-{run}-{i}", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
             "valueQuantity": {"value": 7.1 + i, "unit": "%"},
             "subject": ref(f"Patient/{pid}"), "encounter": ref(f"Encounter/{enc}"),
             "performer": [ref(f"Practitioner/{dr}")]}]
    by_type: dict[str, list[str]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(json.dumps(r))
    for rtype, lines in by_type.items():
        (folder / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")
    return resources


def test_ndjson_cycles_across_types_load_into_hapi(fhir: FhirClient, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:10]
    resources = export(tmp_path, run)
    # the old way, type by type: HAPI refuses the Encounter whose Condition is not there yet
    with pytest.raises(FhirHTTPError) as refused:
        fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"Encounter/{r['id']}"}}
            for r in resources if r["resourceType"] == "Encounter"]})
    assert refused.value.status in (400, 404, 409, 412, 422)

    report = load(fhir, [tmp_path], progress=False)
    assert not report.errors, report.errors
    assert report.counts["Encounter"] == 3 and report.counts["Condition"] == 3
    enc = fhir.read("Encounter", f"enc-{run}-1")
    assert enc["diagnosis"][0]["condition"]["reference"] == f"Condition/cond-{run}-1"
    assert load(fhir, [tmp_path], progress=False).errors == []  # again: idempotent PUTs


def test_ndjson_subset_of_types_loads_without_dangling_references(
        fhir: FhirClient, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:10]
    export(tmp_path, run)
    report = load(fhir, [tmp_path], progress=False, keep_types={"Patient", "Observation"})
    assert not report.errors, report.errors
    assert report.counts == {"Patient": 3, "Observation": 3}
    assert report.stripped == 3 + 3 * 2  # managingOrganization; encounter and performer
    obs = fhir.read("Observation", f"obs-{run}-0")
    assert obs["subject"]["reference"] == f"Patient/pt-{run}-0"
    assert "encounter" not in obs and "performer" not in obs
