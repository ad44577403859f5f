"""A patient's inputs from a FHIR Bundle file, for `knowledge explain`/`stats` and tests.

Uses the same encoders as the worker (lab frame, notes), so what is explained here is what the
worker would see for the same resources.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from clinragen_fhir.encoding.schema import Note, PatientContext, Skip
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


@dataclass
class BundleInputs:
    """One patient's encoded inputs."""

    patient: PatientContext
    labs: pd.DataFrame
    notes: list[Note]
    skips: list[Skip]


def inputs_from_bundle(bundle: dict[str, Any], kg: KnowledgeGraph,
                       now: datetime | None = None) -> BundleInputs:
    """Lab frame, notes and demographics of the (first) patient in a Bundle."""
    from clinragen_fhir.encoding.labs import build_lab_frame
    from clinragen_fhir.encoding.notes import decode_notes
    from clinragen_fhir.pipeline import patient_context

    now = now or datetime.now(UTC)
    patients = resources(bundle, "Patient")
    patient = (patient_context(patients[0], now) if patients
               else PatientContext(patient_id="", index_time=now))
    labs, lab_skips = build_lab_frame(resources(bundle, "Observation"), kg, patient, now)
    notes, note_skips = decode_notes(resources(bundle, "DocumentReference"))
    return BundleInputs(patient, labs, notes, lab_skips + note_skips)


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
