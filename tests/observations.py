"""FHIR resources the integration and reliability suites create: one definition, no side effects.

(The integration helpers import their conftest, which sets environment variables; the reliability
suite runs its own stack, so shared builders live here.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any


def a1c(pid: str, value: float, days_ago: int, oid: str | None = None) -> dict[str, Any]:
    """An HbA1c Observation (LOINC 4548-4, %) for the patient, `days_ago` days before now."""
    when = (datetime.now(UTC) - timedelta(days=days_ago)).replace(microsecond=0)
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4",
                             "display": "Hemoglobin A1c/Hemoglobin.total in Blood"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org",
                          "code": "%"}}
    if oid:
        obs["id"] = oid
    return obs
