"""The loader: idempotent PUTs, support bundles first, NDJSON batches, errors naming files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.fhir.loader import as_idempotent, bundle_files, load, read_ndjson
from tests.conftest import read_bundle


def recording_client(sent: list[dict[str, Any]], fail_on: str = "") -> FhirClient:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if fail_on and fail_on in request.content.decode():
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "invalid", "diagnostics": "bad reference"}]})
        sent.append(body)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"})

    return FhirClient("http://127.0.0.1:1/fhir", transport=httpx.MockTransport(handler), retries=0)


def test_real_bundle_becomes_puts_by_id(patient_bundles: list[Path]) -> None:
    bundle = read_bundle(patient_bundles[0])
    out = as_idempotent(bundle)
    assert len(out["entry"]) == len(bundle["entry"])
    for entry in out["entry"]:
        r = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
        assert entry["fullUrl"].startswith("urn:uuid:")  # kept: in-bundle references resolve
    only = as_idempotent(bundle, {"Patient", "Observation"})
    assert {e["resource"]["resourceType"] for e in only["entry"]} == {"Patient", "Observation"}


def test_conditional_creates_are_kept(data_dir: Path) -> None:
    support = next(data_dir.glob("california/practitionerInformation*.json.gz"))
    out = as_idempotent(read_bundle(support))
    first = out["entry"][0]["request"]
    assert first["method"] == "POST" and first["ifNoneExist"].startswith("identifier=")


def test_support_bundles_go_first(data_dir: Path) -> None:
    files = bundle_files([data_dir / "california"])
    assert files[0].name.startswith(("hospitalInformation", "practitionerInformation"))
    assert files[1].name.startswith(("hospitalInformation", "practitionerInformation"))
    assert not any(f.name.startswith("hospital") for f in files[2:])


def test_load_counts_types_and_names_failing_file(tmp_path: Path,
                                                   patient_bundles: list[Path]) -> None:
    good = patient_bundles[0]
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    rejected = tmp_path / "rejected.json"
    rejected.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "REJECT-ME"},
         "request": {"method": "POST", "url": "Patient"}}]}))
    sent: list[dict[str, Any]] = []
    report = load(recording_client(sent, fail_on="REJECT-ME"), [good, bad, rejected],
                  progress=False)
    n_obs = sum(e["resource"]["resourceType"] == "Observation"
                for e in read_bundle(good)["entry"])
    assert report.counts["Observation"] == n_obs and report.files == 3
    errors = dict(report.errors)
    assert "cannot read" in errors[str(bad)]
    assert "bad reference" in errors[str(rejected)]
    assert len(sent) == 1


def test_ndjson_folder_loads_in_dependency_order(tmp_path: Path) -> None:
    (tmp_path / "Observation.ndjson").write_text("\n".join(json.dumps(
        {"resourceType": "Observation", "id": f"o{i}", "status": "final",
         "code": {"text": "x"}}) for i in range(300)) + "\n")
    with gzip.open(tmp_path / "Patient.ndjson.gz", "wt") as fh:
        fh.write(json.dumps({"resourceType": "Patient", "id": "p1"}) + "\n\n")
    sent: list[dict[str, Any]] = []
    report = load(recording_client(sent), [tmp_path], progress=False)
    assert not report.errors
    assert report.counts == {"Observation": 300, "Patient": 1}
    assert sent[0]["entry"][0]["request"] == {"method": "PUT", "url": "Patient/p1"}
    assert [len(b["entry"]) for b in sent] == [1, 250, 50]


def test_ndjson_bad_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "Patient.ndjson").write_text('{"resourceType": "Patient", "id": "a"}\n{oops\n')
    report = load(recording_client([]), [tmp_path], progress=False)
    assert report.errors and "Patient.ndjson:2" in report.errors[0][1]


def test_ndjson_line_that_is_not_a_resource_object_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "Observation.ndjson"
    path.write_text('{"resourceType": "Observation", "id": "a"}\n\n["not", "a", "resource"]\n')
    rows = read_ndjson(path)
    assert next(rows)["id"] == "a"
    with pytest.raises(FhirError, match=r"Observation\.ndjson:3: not a JSON object"):
        next(rows)
