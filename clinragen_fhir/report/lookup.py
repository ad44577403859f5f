"""Our reports of a patient on the server: the current one (identifier `system|current_key`)
and those written before the report lifecycle (`report_key` values), which the next write
supersedes instead of duplicating."""

from __future__ import annotations

from typing import Any

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.report.build import (
    EXT_BASE,
    is_legacy_key,
)


def our_reports_query(patient_id: str, system: str) -> dict[str, Any]:
    """Every report this software wrote for the patient (any method; current and legacy)."""
    return {"subject": f"Patient/{patient_id}", "identifier": f"{system}|",
            "_sort": "-_lastUpdated"}


def current_of(reports: list[dict[str, Any]], system: str, key: str) -> dict[str, Any] | None:
    """The current report (identifier `system|key`) among `reports`, if any."""
    return next((r for r in reports if any(
        i.get("system") == system and i.get("value") == key
        for i in r.get("identifier", []) or [])), None)


def legacy_of(reports: list[dict[str, Any]], system: str, method: str) -> list[dict[str, Any]]:
    """Reports of this method from before the lifecycle (our identifier system, `report_key`
    values only), in the order given (newest first)."""
    out = []
    for r in reports:
        ours = [str(i.get("value", "")) for i in r.get("identifier", []) or []
                if i.get("system") == system]
        software = next((str(e.get("valueString", "")) for e in r.get("extension", []) or []
                         if e.get("url") == f"{EXT_BASE}/method"), "")
        if ours and all(is_legacy_key(v) for v in ours) and software.split("@")[0] == method:
            out.append(r)
    return out


def find_report(client: FhirClient, patient_id: str, system: str, key: str) -> str | None:
    """The id of an existing report with this identifier, if any."""
    found = find_current(client, patient_id, system, key)
    return str(found.get("id")) if found else None


def find_current(client: FhirClient, patient_id: str, system: str,
                 key: str) -> dict[str, Any] | None:
    """The current report (identifier `system|key`, `report.build.current_key`), if any."""
    for resource in client.search("DiagnosticReport", {
            "subject": f"Patient/{patient_id}", "identifier": f"{system}|{key}"}):
        return resource
    return None


def find_legacy(client: FhirClient, patient_id: str, system: str,
                method: str) -> list[dict[str, Any]]:
    """Reports of this patient and method from before the lifecycle (our identifier system, a
    `report_key` value, no current identifier), newest first."""
    return legacy_of(list(client.search("DiagnosticReport",
                                        our_reports_query(patient_id, system))), system, method)
