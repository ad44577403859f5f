"""The loader: idempotent PUTs, support bundles first, NDJSON in reference order, errors naming
files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.fhir.loader import (
    _put_bundle,
    as_idempotent,
    bundle_files,
    load,
    plan_ndjson,
    read_ndjson,
    references,
    strip_references,
)
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


def integrity_server(stored: dict[str, dict[str, Any]], sent: list[dict[str, Any]],
                     reject_id: str = "") -> FhirClient:
    """A fake server that, like HAPI, refuses a transaction (400) with a reference to a
    resource neither stored already nor in the same transaction; nothing of it is stored."""
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        batch = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
                 for e in body["entry"]}
        for ref, resource in batch.items():
            missing = [t for t in references(resource) if t not in stored and t not in batch]
            if missing or ref.endswith(f"/{reject_id}"):
                return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "processing",
                     "diagnostics": f"Resource {(missing or [ref])[0]} not found"}]})
        stored.update(batch)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"})

    return FhirClient("http://127.0.0.1:1/fhir", transport=httpx.MockTransport(handler), retries=0)


def write_ndjson(folder: Path, resources: list[dict[str, Any]]) -> None:
    by_type: dict[str, list[str]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(json.dumps(r))
    for rtype, lines in by_type.items():
        (folder / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def clinosim_like(pid: str, org: str = "org1") -> list[dict[str, Any]]:
    """One patient as clinosim exports it: Encounter and Condition reference each other."""
    return [
        {"resourceType": "Patient", "id": pid, "managingOrganization": ref(f"Organization/{org}")},
        {"resourceType": "Encounter", "id": f"{pid}-e", "subject": ref(f"Patient/{pid}"),
         "diagnosis": [{"condition": ref(f"Condition/{pid}-c"), "rank": 1}],
         "participant": [{"individual": ref("Practitioner/dr1")}]},
        {"resourceType": "Condition", "id": f"{pid}-c", "subject": ref(f"Patient/{pid}"),
         "encounter": ref(f"Encounter/{pid}-e")},
        {"resourceType": "Observation", "id": f"{pid}-o", "status": "final",
         "code": {"text": "x"}, "subject": ref(f"Patient/{pid}"),
         "encounter": ref(f"Encounter/{pid}-e"), "performer": [ref("Practitioner/dr1")]},
    ]


SHARED = [{"resourceType": "Organization", "id": "org1"},
          {"resourceType": "Practitioner", "id": "dr1"},
          {"resourceType": "Location", "id": "loc1",
           "managingOrganization": ref("Organization/org1")}]


def test_ndjson_with_cross_type_cycles_loads_where_references_are_enforced(
        tmp_path: Path) -> None:
    write_ndjson(tmp_path, SHARED + clinosim_like("p1") + clinosim_like("p2"))
    stored: dict[str, dict[str, Any]] = {}
    sent: list[dict[str, Any]] = []
    report = load(integrity_server(stored, sent), [tmp_path], progress=False)
    assert not report.errors, report.errors
    assert len(stored) == 3 + 8 and report.stripped == 0
    assert report.counts == {"Patient": 2, "Encounter": 2, "Condition": 2, "Observation": 2,
                             "Organization": 1, "Practitioner": 1, "Location": 1}
    # what is referenced first (org1, dr1), then what references them: the Location and both
    # patients' compartments, each compartment whole, in one transaction (11 < 250 entries)
    ids = [{e["resource"]["id"] for e in b["entry"]} for b in sent]
    assert ids == [{"org1", "dr1"}, {"loc1"} | {f"{p}{s}" for p in ("p1", "p2")
                                                 for s in ("", "-e", "-c", "-o")}]
    for b in sent:
        for e in b["entry"]:
            r = e["resource"]
            assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
    # loading again is idempotent: the same PUTs, nothing refused
    again = load(integrity_server(stored, []), [tmp_path], progress=False)
    assert not again.errors and len(stored) == 11


def test_type_by_type_order_is_what_fails(tmp_path: Path) -> None:
    """The order the loader used before: Encounter in a batch before Condition is refused."""
    stored: dict[str, dict[str, Any]] = {}
    client = integrity_server(stored, [])
    with pytest.raises(FhirError, match=r"Condition/\S+ not found"):
        for rtype in ("Organization", "Practitioner", "Patient", "Encounter", "Condition"):
            client.transaction(_put_bundle([r for r in SHARED + clinosim_like("p1")
                                            if r["resourceType"] == rtype]))


def test_references_to_types_left_out_are_removed_and_others_kept(tmp_path: Path) -> None:
    resources = SHARED + clinosim_like("p1")
    resources[-1]["specimen"] = ref("Specimen/not-exported")  # may be on the server already
    write_ndjson(tmp_path, resources)
    stored: dict[str, dict[str, Any]] = {"Specimen/not-exported": {}}
    report = load(integrity_server(stored, []), [tmp_path], progress=False,
                  keep_types={"Patient", "Observation"})
    assert not report.errors, report.errors
    assert set(stored) == {"Specimen/not-exported", "Patient/p1", "Observation/p1-o"}
    obs = stored["Observation/p1-o"]
    # encounter and the performer (exported, not loaded) went; the list left empty went too
    assert obs["subject"] == ref("Patient/p1") and obs["specimen"] == ref("Specimen/not-exported")
    assert "encounter" not in obs and "performer" not in obs
    assert "managingOrganization" not in stored["Patient/p1"]
    assert report.stripped == 3


def test_strip_references_drops_emptied_containers() -> None:
    enc = clinosim_like("p1")[1]
    out, n = strip_references(enc, lambda t: t.startswith(("Condition/", "Practitioner/")))
    assert n == 2
    assert out == {"resourceType": "Encounter", "id": "p1-e", "subject": ref("Patient/p1"),
                   "diagnosis": [{"rank": 1}]}


def test_one_refused_patient_does_not_take_the_others_down(tmp_path: Path) -> None:
    write_ndjson(tmp_path, SHARED + clinosim_like("p1") + clinosim_like("p2")
                 + clinosim_like("p3"))
    stored: dict[str, dict[str, Any]] = {}
    report = load(integrity_server(stored, [], reject_id="p2-o"), [tmp_path], progress=False)
    assert {k for k in stored if k.startswith("Patient/")} == {"Patient/p1", "Patient/p3"}
    assert len(report.errors) == 1
    name, _ = report.errors[0]
    assert str(tmp_path) in name and "4 resources" in name and "p2" not in name
    assert report.counts["Patient"] == 2


def test_patients_are_packed_but_never_split(tmp_path: Path) -> None:
    big = clinosim_like("big") + [
        {"resourceType": "Observation", "id": f"big-{i}", "subject": ref("Patient/big")}
        for i in range(10)]
    small = [r for i in range(6) for r in clinosim_like(f"s{i}")]
    write_ndjson(tmp_path, SHARED + big + small)
    plan = plan_ndjson(tmp_path, batch=9)
    patient_wave = plan.waves[-1]
    sizes = sorted(sum(len(u) for u in units) for units in patient_wave)
    assert 14 in sizes  # the big patient whole, although over the batch size
    assert all(s <= 9 for s in sizes if s != 14)
    assert sum(sizes) == 14 + 24 + 1  # the Location references org1 as well: same wave


def test_a_reference_cycle_between_shared_resources_goes_in_one_transaction(
        tmp_path: Path) -> None:
    write_ndjson(tmp_path, [
        {"resourceType": "Organization", "id": "a", "partOf": ref("Organization/b")},
        {"resourceType": "Organization", "id": "b", "partOf": ref("Organization/a")},
        {"resourceType": "Organization", "id": "root"}])
    stored: dict[str, dict[str, Any]] = {}
    sent: list[dict[str, Any]] = []
    report = load(integrity_server(stored, sent), [tmp_path], progress=False)
    assert not report.errors and len(stored) == 3
    assert [{e["resource"]["id"] for e in b["entry"]} for b in sent] == [{"root"}, {"a", "b"}]


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
