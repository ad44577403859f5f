"""What the worker reads from the server for one patient: the Patient, their laboratory and
vital-signs Observations within the lookback, and their DocumentReferences (every page).

One function, so that the pipeline (`pipeline.gather_inputs`) and `clinragen-fhir knowledge
explain --fhir` read the same resources with the same searches; encoding them is
`encoding.patient.encode_patient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from clinragen_fhir.fhir.client import FhirClient


@dataclass
class PatientRead:
    """The resources read for one patient, and the searches as sent, (type, parameters): the
    read AuditEvent's BALP query entities."""

    patient: dict[str, Any]
    observations: list[dict[str, Any]]
    documents: list[dict[str, Any]]
    queries: list[tuple[str, dict[str, Any]]]

    def counts(self) -> dict[str, int]:
        """Resources read, by type (for the audit)."""
        return {"Observation": len(self.observations),
                "DocumentReference": len(self.documents)}


def patient_queries(patient_id: str, since: str) -> list[tuple[str, dict[str, Any]]]:
    """The searches of one patient's inputs: Observations dated from `since` (a date), notes."""
    return [("Observation", {"patient": patient_id, "category": "laboratory,vital-signs",
                             "date": f"ge{since}"}),
            ("DocumentReference", {"patient": patient_id})]


def read_patient(client: FhirClient, patient_id: str, lookback_days: int,
                 now: datetime) -> PatientRead:
    """Read the patient, their labs/vitals of the last `lookback_days` and their notes."""
    since = (now - timedelta(days=lookback_days)).date().isoformat()
    resource = client.read("Patient", patient_id)
    queries = patient_queries(patient_id, since)
    observations = list(client.search(*queries[0]))
    documents = list(client.search(*queries[1]))
    return PatientRead(resource, observations, documents, queries)
