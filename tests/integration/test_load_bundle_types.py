"""`load --types` of a real Synthea transaction Bundle into real HAPI (issue 13, item 13).

HAPI answered HAPI-0541 (unable to satisfy placeholder ID) for every Synthea bundle loaded with
`--types Patient,Observation,DocumentReference`: the Encounters were left out, the `urn:uuid:`
references to them were not. The fixture is a trimmed Synthea 3.3.0 bundle
(tests/fixtures/synthea-bundle/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clinragen_fhir.cli import main
from clinragen_fhir.fhir.client import FhirClient

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "synthea-bundle"


def test_synthea_bundle_loads_into_hapi_with_types(fhir: FhirClient) -> None:
    result = CliRunner().invoke(main, ["load", "--types", "Patient,Observation,DocumentReference",
                                       str(FIXTURE)])
    assert result.exit_code == 0, result.output
    assert "HAPI-0541" not in result.output and "5 references" in result.output
    bundle = json.loads((FIXTURE / "Maile198_Larson43_trimmed.json").read_text())
    by_type = {e["resource"]["resourceType"]: e["resource"]["id"] for e in bundle["entry"]}
    doc = fhir.read("DocumentReference", by_type["DocumentReference"])
    assert doc["subject"]["reference"] == f"Patient/{by_type['Patient']}"
    assert "encounter" not in doc["context"]
    found = list(fhir.search("Observation", {"patient": by_type["Patient"],
                                             "_id": ",".join(
        e["resource"]["id"] for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation")}))
    assert len(found) == 2 and all("encounter" not in o for o in found)
