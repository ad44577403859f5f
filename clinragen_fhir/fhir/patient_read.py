"""What the worker reads from the server for one patient: the Patient, their laboratory and
vital-signs Observations within the lookback, and their DocumentReferences (every page), in
one batch Bundle with whatever else the caller needs of the patient (its current report, the
problem list).

One function, so that the pipeline (`pipeline.gather_inputs`) and `clinragen-fhir knowledge
explain --fhir` read the same resources with the same searches; encoding them is
`encoding.patient.encode_patient`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError


@dataclass
class PatientRead:
    """The resources read for one patient, and the searches as sent, (type, parameters): the
    read AuditEvent's BALP query entities."""

    patient: dict[str, Any]
    observations: list[dict[str, Any]]
    documents: list[dict[str, Any]]
    queries: list[tuple[str, dict[str, Any]]]
    # the answers of the `extra` searches read in the same batch, in order
    extra: list[list[dict[str, Any]] | FhirError] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Resources read, by type (for the audit)."""
        return {"Observation": len(self.observations),
                "DocumentReference": len(self.documents)}


def patient_queries(patient_id: str, since: str) -> list[tuple[str, dict[str, Any]]]:
    """The searches of one patient's inputs: Observations dated from `since` (a date), notes."""
    return [("Observation", {"patient": patient_id, "category": "laboratory,vital-signs",
                             "date": f"ge{since}"}),
            ("DocumentReference", {"patient": patient_id})]


def read_patient(client: FhirClient, patient_id: str, lookback_days: int, now: datetime,
                 extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> PatientRead:
    """Read the patient, their labs/vitals of the last `lookback_days` and their notes, in one
    batch Bundle (`FhirClient.batch_search`: one round trip, then a request per page beyond
    each search's first). `extra` searches go in the same batch; their answers (the resources,
    or the FhirError of that entry) are in `PatientRead.extra`, in order. A failing read of the
    patient's own inputs raises its error, as a request of its own would."""
    since = (now - timedelta(days=lookback_days)).date().isoformat()
    queries = patient_queries(patient_id, since)
    answers = client.batch_search([(f"Patient/{patient_id}", None), *queries, *extra])
    for answer in answers[:3]:
        if isinstance(answer, FhirError):
            raise answer
    resource, observations, documents = (cast(list[dict[str, Any]], a) for a in answers[:3])
    return PatientRead(resource[0], observations, documents, queries, answers[3:])
