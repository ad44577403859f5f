"""One patient's FHIR resources -> the inputs every predictor reads: the one patient encoding.

The worker (`pipeline.gather_inputs`, after reading the server), the knowledge CLI and tools
(`knowledge.bundle.inputs_from_bundle`, from a Bundle file) and training
(`training.data.encode_record`, from a patient record) all call `encode_patient`, so what is
explained, trained on and diagnosed is the same encoding of the same resources.

No I/O here: the caller reads the resources (a server, a Bundle, NDJSON) and passes them in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from fhir.resources.R4B.patient import Patient
from pydantic import ValidationError

from clinragen_fhir.encoding.labs import LabKnowledge, build_lab_frame
from clinragen_fhir.encoding.notes import extract_notes
from clinragen_fhir.encoding.schema import Note, PatientContext, Skip
from clinragen_fhir.fhir.resources import first_error, to_utc
from clinragen_fhir.logs import hash_id

log = logging.getLogger(__name__)


@dataclass
class PatientInputs:
    """One patient's encoded inputs: demographics, the lab frame, the notes, and every input
    not used with the reason (`Skip`)."""

    patient: PatientContext
    labs: pd.DataFrame
    notes: list[Note]
    skips: list[Skip]
    resource: dict[str, Any] = field(default_factory=dict)  # the Patient as read ({} if none)


def patient_context(resource: dict[str, Any], now: datetime) -> PatientContext:
    """Sex and birth date for reference ranges; a malformed Patient still gets an id."""
    pid = str(resource.get("id", ""))
    try:
        patient = Patient.model_validate(resource)
    except ValidationError as exc:
        log.warning("patient unparsed", extra={"fields": {"patient": hash_id(pid),
                                                           "reason": first_error(exc)}})
        return PatientContext(patient_id=pid, index_time=now)
    birth = to_utc(patient.birthDate)
    return PatientContext(patient_id=pid, sex=patient.gender,
                          birth_date=birth.to_pydatetime() if birth is not None else None,
                          index_time=now)


def encode_patient(patient: dict[str, Any] | None, observations: Iterable[dict[str, Any]],
                   documents: Iterable[dict[str, Any]], kg: LabKnowledge,
                   now: datetime | None = None, patient_id: str = "") -> PatientInputs:
    """The Patient resource (None when there is none: `patient_id` names the patient), its
    Observations and DocumentReferences -> `PatientInputs`, reference ranges for the patient's
    sex and age at `now`."""
    now = now or datetime.now(UTC)
    context = (patient_context(patient, now) if patient
               else PatientContext(patient_id=patient_id, index_time=now))
    labs, lab_skips = build_lab_frame(observations, kg, context, now)
    notes, note_skips = extract_notes(documents)
    return PatientInputs(context, labs, notes, lab_skips + note_skips, patient or {})
