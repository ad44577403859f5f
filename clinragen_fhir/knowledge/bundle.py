"""A patient's inputs from a FHIR Bundle file, for `knowledge explain`/`stats` and tests.

Uses the worker's encoding (`encoding.patient.encode_patient`), so what is explained here is
what the worker would see for the same resources.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from clinragen_fhir.encoding.patient import PatientInputs, encode_patient
from clinragen_fhir.knowledge.graph import KnowledgeGraph


def read_bundle(path: str | Path) -> dict[str, Any]:
    """A Bundle from .json or .json.gz."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise ValueError(f"{p} is not a FHIR Bundle")
    return data


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == rtype]


def inputs_from_bundle(bundle: dict[str, Any], kg: KnowledgeGraph,
                       now: datetime | None = None) -> PatientInputs:
    """Lab frame, notes and demographics of the (first) patient in a Bundle."""
    patients = resources(bundle, "Patient")
    return encode_patient(patients[0] if patients else None, resources(bundle, "Observation"),
                          resources(bundle, "DocumentReference"), kg, now)


def find_patient_bundle(data_dir: Path, patient_id: str) -> Path | None:
    """The bundle file of a patient id (file names start with the patient's name, so read)."""
    for p in sorted(data_dir.rglob("*.json*")):
        if p.name.startswith(("hospitalInformation", "practitionerInformation")):
            continue
        if patient_id in p.name:
            return p
    for p in sorted(data_dir.rglob("*.json*")):
        try:
            b = read_bundle(p)
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        if any(r.get("id") == patient_id for r in resources(b, "Patient")):
            return p
    return None
