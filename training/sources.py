"""Raw per-patient FHIR resources from Bundle files, Bulk Data NDJSON folders or a live server.

The dataset builder needs Conditions (for labels) besides what the worker reads, so the readers
here return the raw resources grouped by patient; encoding happens once, in `training.data`, with
the worker's own encoders.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.loader import SUPPORT_PREFIXES, bundle_files, read_ndjson

JsonDict = dict[str, Any]
WANTED = ("Patient", "Observation", "DocumentReference", "Condition")
INPUT_CATEGORIES = {"laboratory", "vital-signs"}


@dataclass
class PatientRecord:
    """Everything one patient has that the dataset uses, as raw FHIR JSON."""

    patient_id: str
    patient: JsonDict | None = None
    observations: list[JsonDict] = field(default_factory=list)
    documents: list[JsonDict] = field(default_factory=list)
    conditions: list[JsonDict] = field(default_factory=list)
    origin: str = ""  # file name or server (no patient identifiers beyond the id itself)

    def add(self, resource: JsonDict) -> None:
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            self.patient = resource
        elif rtype == "Observation":
            if _is_input_observation(resource):
                self.observations.append(resource)
        elif rtype == "DocumentReference":
            self.documents.append(resource)
        elif rtype == "Condition":
            self.conditions.append(resource)


def _is_input_observation(resource: JsonDict) -> bool:
    """Only lab and vital-sign Observations feed the lab frame: dropping surveys and social
    history early keeps big NDJSON cohorts small in memory."""
    for concept in resource.get("category") or []:
        for coding in (concept or {}).get("coding") or []:
            if coding.get("code") in INPUT_CATEGORIES:
                return True
    return False


def subject_id(resource: JsonDict) -> str | None:
    """The patient id a resource is about ('Patient/x', 'urn:uuid:x' or a Patient itself)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return str(rid) if rid else None
    ref = (resource.get("subject") or resource.get("patient") or {}).get("reference")
    if not isinstance(ref, str) or not ref:
        return None
    if ref.startswith("urn:uuid:"):
        return ref[len("urn:uuid:"):]
    parts = ref.split("/")
    if len(parts) >= 2 and parts[-2] == "Patient":
        return parts[-1]
    if "Patient" in parts:  # absolute URL, or with _history
        i = parts.index("Patient")
        return parts[i + 1] if i + 1 < len(parts) else None
    return None


def records_from_bundle(bundle: JsonDict, origin: str = "") -> list[PatientRecord]:
    """One record per Patient in the Bundle; resources about patients not in it are ignored."""
    by_id: dict[str, PatientRecord] = {}
    others: list[JsonDict] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") not in WANTED:
            continue
        if resource["resourceType"] == "Patient":
            pid = subject_id(resource)
            if pid:
                by_id.setdefault(pid, PatientRecord(pid, origin=origin)).add(resource)
        else:
            others.append(resource)
    for resource in others:
        pid = subject_id(resource)
        if pid in by_id:
            by_id[pid].add(resource)
    return [by_id[k] for k in sorted(by_id)]


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else \
        path.open(encoding="utf-8")


def read_json(path: Path) -> JsonDict:
    with _open_text(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def patient_bundle_files(paths: Iterable[Path]) -> list[Path]:
    """Bundle files under the paths, without the shared organisation/practitioner bundles."""
    return [p for p in bundle_files(paths) if not p.name.startswith(SUPPORT_PREFIXES)]


def iter_bundle_records(paths: Iterable[Path]) -> Iterator[PatientRecord]:
    """Patients of transaction/collection Bundles (.json, .json.gz), file by file."""
    for path in patient_bundle_files(paths):
        bundle = read_json(path)
        if bundle.get("resourceType") != "Bundle":
            raise ValueError(f"{path} is not a FHIR Bundle")
        yield from records_from_bundle(bundle, origin=path.name)


def ndjson_files(folder: Path) -> list[Path]:
    """The NDJSON files of a Bulk Data export that the dataset reads (by resource type)."""
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith((".ndjson", ".ndjson.gz")) and p.name.split(".")[0] in WANTED)


def iter_ndjson_records(folder: Path) -> Iterator[PatientRecord]:
    """Patients of a Bulk Data export folder (`Patient.ndjson`, `Observation.ndjson`, ...).

    NDJSON is grouped by type, not patient, so all wanted resources are read before the first
    record is yielded; Observations other than labs and vitals are dropped while reading.
    """
    by_id: dict[str, PatientRecord] = {}
    orphans: dict[str, list[JsonDict]] = {}
    for path in ndjson_files(folder):
        for resource in read_ndjson(path):
            if resource.get("resourceType") not in WANTED:
                continue
            pid = subject_id(resource)
            if pid is None:
                continue
            if resource["resourceType"] == "Patient":
                rec = by_id.setdefault(pid, PatientRecord(pid, origin=folder.name))
                rec.add(resource)
                for r in orphans.pop(pid, []):
                    rec.add(r)
            elif pid in by_id:
                by_id[pid].add(resource)
            else:  # resource file read before Patient.ndjson
                orphans.setdefault(pid, []).append(resource)
    for pid in sorted(by_id):
        yield by_id[pid]


def iter_server_records(client: FhirClient, patient_ids: Iterable[str] | None = None,
                        patient_query: dict[str, str] | None = None,
                        since: str | None = None) -> Iterator[PatientRecord]:
    """Patients read from a live FHIR server with the worker's client and the worker's searches
    (plus Conditions). Without ids, every Patient matching `patient_query` is read."""
    if patient_ids is None:
        patient_ids = [str(r["id"]) for r in client.search("Patient", {
            "_elements": "id", **(patient_query or {})}) if r.get("id")]
    origin = "fhir:" + hashlib.sha256(client.base_url.encode()).hexdigest()[:12]
    for pid in sorted(set(patient_ids)):
        rec = PatientRecord(pid, origin=origin)
        rec.add(client.read("Patient", pid))
        obs_params = {"patient": pid, "category": "laboratory,vital-signs"}
        if since:
            obs_params["date"] = f"ge{since}"
        for resource in client.search("Observation", obs_params):
            rec.add(resource)
        for resource in client.search("DocumentReference", {"patient": pid}):
            rec.add(resource)
        for resource in client.search("Condition", {"patient": pid}):
            rec.add(resource)
        yield rec


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 over the files' names and bytes, in path order: what a dataset was built from."""
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.name.encode() + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
