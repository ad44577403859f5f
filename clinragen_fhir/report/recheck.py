"""Re-checking written reports: what changed in the inputs a report cites since it was written.

A report is only as good as the values it cites, and FHIR data changes after the fact (a lab is
corrected, a note amended, a resource deleted). `recheck` compares every input a report cites
(its Provenance entities, `Type/id/_history/version`, and the values in its `cited-value`
extensions) with the server's current data and names what changed, so a clinician can be told
that a report was based on superseded data. The comparison is pure (`compare`); the client
calls around it fetch the current versions in batches (`_id` search) and read old versions
only for inputs that changed. The AuditEvents the worker writes are `report.audit`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.report.build import (
    EXT_BASE,
    MODEL_EXT,
    provenance_id,
    stored_fingerprint,
)

ID_CHUNK = 100  # ids per `_id` search


@dataclass(frozen=True)
class Cited:
    """One input a report cites: its version and, for a lab reading, the value as sent."""

    reference: str  # "Observation/<id>"
    version: str
    loinc: str = ""
    value: float | None = None
    unit: str = ""
    time: str = ""


@dataclass(frozen=True)
class Change:
    reference: str
    version: str
    # new-version | value-changed | deleted | cited-version-unreadable | cited-value-mismatch
    kind: str
    detail: str = ""


@dataclass
class ReportAudit:
    """One report and what changed in its inputs since it was written."""

    report_id: str
    patient_id: str
    issued: str
    method: str
    knowledge_version: str
    diagnoses: list[str]
    n_inputs: int = 0
    n_values: int = 0
    changes: list[Change] = field(default_factory=list)
    model: str = ""  # identity.model_identity the report carries ("" before the lifecycle)
    version: str = ""  # the report's meta.versionId (the lifecycle: one report, versions)

    @property
    def status(self) -> str:
        return "inputs-changed" if self.changes else "unchanged"


def _ext(resource: Mapping[str, Any], name: str) -> str:
    url = name if name.startswith("http") else f"{EXT_BASE}/{name}"
    return next((str(e.get("valueString", "")) for e in resource.get("extension", []) or []
                 if e.get("url") == url), "")


def split_versioned(ref: str) -> tuple[str, str]:
    """'Observation/1/_history/3' -> ('Observation/1', '3'); unversioned -> (ref, '')."""
    base, _, version = ref.partition("/_history/")
    return base, version


def cited_inputs(report: Mapping[str, Any], provenance: Mapping[str, Any] | None) -> list[Cited]:
    """Every input the report used (Provenance entities without a skip reason) and every value
    it cites (its cited-value extensions)."""
    out: list[Cited] = []
    for e in (provenance or {}).get("entity", []) or []:
        exts = e.get("extension", []) or []
        if any(str(x.get("url", "")).endswith("/skip-reason") for x in exts):
            continue
        base, version = split_versioned(str((e.get("what") or {}).get("reference", "")))
        if base:
            out.append(Cited(base, version))
    for ext in report.get("extension", []) or []:
        if ext.get("url") != f"{EXT_BASE}/cited-value":
            continue
        parts = {p.get("url"): p for p in ext.get("extension", []) or []}
        base, version = split_versioned(str(parts.get("source", {}).get("valueString", "")))
        q = parts.get("value", {}).get("valueQuantity") or {}
        out.append(Cited(base, version, str(parts.get("code", {}).get("valueCoding", {})
                                            .get("code", "")),
                         float(q["value"]) if "value" in q else None, str(q.get("unit", "")),
                         str(parts.get("time", {}).get("valueDateTime", ""))))
    return out


def quantity_of(resource: Mapping[str, Any] | None, loinc: str = "") -> tuple[float, str] | None:
    """The Observation's value (or the component's with this LOINC code) as (value, unit)."""
    if not resource:
        return None

    def has_code(el: Mapping[str, Any]) -> bool:
        return any(c.get("code") == loinc for c in (el.get("code") or {}).get("coding", []) or [])

    candidates = [resource] if not loinc or has_code(resource) else []
    candidates += [c for c in resource.get("component", []) or [] if not loinc or has_code(c)]
    for el in candidates:
        q = el.get("valueQuantity")
        if isinstance(q, dict) and isinstance(q.get("value"), int | float):
            return float(q["value"]), str(q.get("code") or q.get("unit") or "")
    return None


def _value_signature(resource: Mapping[str, Any] | None) -> str:
    """What a reading says, for comparing two versions: value[x], components, status."""
    if not resource:
        return ""
    keys = sorted(k for k in resource if k.startswith("value") or k in ("component", "status",
                                                                         "content"))
    return repr([(k, resource[k]) for k in keys])


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _version_of(resource: Mapping[str, Any]) -> str:
    return str((resource.get("meta") or {}).get("versionId", ""))


def compare(cited: Sequence[Cited], current: Mapping[str, Mapping[str, Any] | None],
            historic: Mapping[str, Mapping[str, Any] | None]) -> list[Change]:
    """What changed. `current`: reference -> current resource (None: gone); `historic`:
    'ref/_history/v' -> that version (None: unreadable), needed only for changed inputs."""
    changes: list[Change] = []
    inputs = list(dict.fromkeys((c.reference, c.version) for c in cited))
    for ref, version in inputs:
        now = current.get(ref)
        if now is None:
            changes.append(Change(ref, version, "deleted", "no longer on the server"))
            continue
        latest = _version_of(now)
        if version and latest and latest != version:
            changes.append(Change(ref, version, "new-version", f"v{version} -> v{latest}"))
            values = [c for c in cited if (c.reference, c.version) == (ref, version)
                      and c.value is not None]
            old = historic.get(f"{ref}/_history/{version}")
            if old is None:
                changes.append(Change(ref, version, "cited-version-unreadable",
                                      "the cited version cannot be read (expunged?)"))
            elif not values and _value_signature(old) != _value_signature(now):
                changes.append(Change(ref, version, "value-changed", "value or status differs"))
    for c in cited:
        if c.value is None:
            continue
        now = current.get(c.reference)
        if now is None:
            continue
        changed_version = bool(c.version) and _version_of(now) not in ("", c.version)
        at_citation = historic.get(f"{c.reference}/_history/{c.version}") if changed_version \
            else now
        was = quantity_of(at_citation, c.loinc)
        if at_citation is not None and (was is None or not _same(was[0], c.value)):
            had = "no value" if was is None else f"{format_value(was[0])} {was[1]}"
            changes.append(Change(c.reference, c.version, "cited-value-mismatch",
                                  f"report cites {format_value(c.value)} {c.unit}, version "
                                  f"{c.version} has {had}"))
        is_now = quantity_of(now, c.loinc)
        if changed_version and (is_now is None or not _same(is_now[0], c.value)):
            new = "no value" if is_now is None else f"{format_value(is_now[0])} {is_now[1]}"
            changes.append(Change(c.reference, c.version, "value-changed",
                                  f"{format_value(c.value)} {c.unit} -> {new}"))
    return changes


# -- client calls ----------------------------------------------------------------------------
def list_reports(client: FhirClient, system: str, *, patient: str | None = None,
                 since: str | None = None, until: str | None = None,
                 method: str | None = None) -> Iterator[dict[str, Any]]:
    """Reports this software wrote (our identifier system), newest first, filtered."""
    params: dict[str, Any] = {"identifier": f"{system}|", "_sort": "-issued"}
    if patient:
        params["subject"] = f"Patient/{patient}"
    dates = [f"ge{since}"] if since else []
    dates += [f"le{until}"] if until else []
    if dates:
        params["issued"] = dates
    for r in client.search("DiagnosticReport", params):
        if not any(i.get("system") == system for i in r.get("identifier", []) or []):
            continue
        software = _ext(r, "method")
        if method and method not in (software, *software.split("@"), _ext(r, MODEL_EXT)):
            continue
        yield r


def provenance_of(client: FhirClient, report_id: str,
                  report: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The report's Provenance. A report of the lifecycle has one per version (targeting the
    same report): the one of the version given (`report`, by its identifier and content
    fingerprint, `build.provenance_id`), else the most recently recorded."""
    found = list(client.search("Provenance", {"target": f"DiagnosticReport/{report_id}"}))
    fingerprint = stored_fingerprint(report or {})
    if fingerprint:
        system_values = [str(i.get("value", "")) for i in (report or {}).get("identifier", [])
                         or []]
        wanted = {provenance_id(v, fingerprint) for v in system_values}
        match = next((p for p in found if p.get("id") in wanted), None)
        if match is not None:
            return match
    return max(found, key=lambda p: str(p.get("recorded", "")), default=None)


def fetch_current(client: FhirClient, references: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Current versions by reference, `_id` searches of up to ID_CHUNK ids per type."""
    by_type: dict[str, list[str]] = {}
    for ref in dict.fromkeys(references):
        rtype, _, rid = ref.partition("/")
        if rid:
            by_type.setdefault(rtype, []).append(rid)
    found: dict[str, dict[str, Any]] = {}
    for rtype, ids in by_type.items():
        for i in range(0, len(ids), ID_CHUNK):
            chunk = ids[i:i + ID_CHUNK]
            for r in client.search(rtype, {"_id": ",".join(chunk), "_count": len(chunk)}):
                found[f"{rtype}/{r.get('id')}"] = r
    return found


def fetch_version(client: FhirClient, reference: str, version: str) -> dict[str, Any] | None:
    rtype, _, rid = reference.partition("/")
    try:
        return client.read(rtype, f"{rid}/_history/{version}")
    except FhirHTTPError as exc:
        if exc.status in (404, 410):
            return None
        raise


def summarise(report: Mapping[str, Any]) -> ReportAudit:
    """What a report says about itself (no server calls; nothing re-checked yet)."""
    return ReportAudit(
        report_id=str(report.get("id", "")),
        patient_id=str((report.get("subject") or {}).get("reference", "")).removeprefix(
            "Patient/"),
        issued=str(report.get("issued", "")),
        method=_ext(report, "method"),
        knowledge_version=_ext(report, "knowledge-version"),
        model=_ext(report, MODEL_EXT),
        version=str((report.get("meta") or {}).get("versionId", "")),
        diagnoses=[c.get("code", "") for cc in report.get("conclusionCode", []) or []
                   for c in cc.get("coding", []) or [] if c.get("system") == SNOMED])


def recheck(client: FhirClient, report: Mapping[str, Any],
            provenance: Mapping[str, Any] | None = None) -> ReportAudit:
    """Compare one report's cited inputs with the server's current data."""
    rid = str(report.get("id", ""))
    if provenance is None:
        provenance = provenance_of(client, rid, report)
    cited = cited_inputs(report, provenance)
    current: dict[str, Mapping[str, Any] | None] = dict(
        fetch_current(client, (c.reference for c in cited)))
    historic: dict[str, Mapping[str, Any] | None] = {}
    for c in cited:
        now = current.get(c.reference)
        key = f"{c.reference}/_history/{c.version}"
        if now is not None and c.version and _version_of(now) != c.version and key not in historic:
            historic[key] = fetch_version(client, c.reference, c.version)
    audit = summarise(report)
    audit.n_inputs = len({(c.reference, c.version) for c in cited})
    audit.n_values = sum(1 for c in cited if c.value is not None)
    if provenance is None:
        audit.changes.append(Change(f"DiagnosticReport/{rid}", "", "no-provenance",
                                    "the report has no Provenance: inputs unknown"))
        return audit
    audit.changes = compare(cited, current, historic)
    return audit


def safe_recheck(client: FhirClient, report: Mapping[str, Any]) -> ReportAudit:
    """recheck, but a server error on one report is recorded on it rather than ending the run."""
    try:
        return recheck(client, report)
    except FhirError as exc:
        audit = summarise(report)
        audit.changes = [Change(f"DiagnosticReport/{audit.report_id}", "", "recheck-failed",
                                type(exc).__name__)]
        return audit


CSV_COLUMNS = ("report", "patient", "issued", "method", "knowledge_version", "diagnoses",
               "inputs", "cited_values", "status", "changes", "model", "version")


def write_csv(audits: Iterable[ReportAudit], fh: IO[str]) -> int:
    """One row per report; `changes` lists 'kind reference/_history/v: detail' separated by ';'."""
    writer = csv.writer(fh)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for a in audits:
        writer.writerow([f"DiagnosticReport/{a.report_id}", a.patient_id, a.issued, a.method,
                         a.knowledge_version, " ".join(a.diagnoses), a.n_inputs, a.n_values,
                         a.status, "; ".join(
                             f"{c.kind} {c.reference}/_history/{c.version}: {c.detail}"
                             if c.version else f"{c.kind} {c.reference}: {c.detail}"
                             for c in a.changes), a.model, a.version])
        n += 1
    return n
