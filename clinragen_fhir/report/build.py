"""A Prediction -> one transaction Bundle: DiagnosticReport + Provenance (+ the software Device).

Idempotent by construction: the report's identifier is a hash of the patient, every input
resource's version and the method/knowledge versions, and it is written by conditional create
(`ifNoneExist`), so the same inputs never give a second report. The Provenance has an id derived
from the same hash and is written by PUT, so it is never duplicated either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from clinragen_fhir import __version__
from clinragen_fhir.config import ReportSettings
from clinragen_fhir.encoding.schema import Skip
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.predict.types import Prediction
from clinragen_fhir.report.faithfulness import ClaimCheck, claim_text
from clinragen_fhir.report.html import (
    lab_trends,
    narrative_div,
    patient_header,
    presented_form,
    render_html,
)

SOFTWARE = "ClinRaGen-FHIR"
EXT_BASE = "https://clinragen-fhir.org/StructureDefinition"
DEVICE_ID_SYSTEM = "urn:clinragen-fhir:software"
CATEGORY_SYSTEM = "https://clinragen-fhir.org/CodeSystem/report-category"
PROFILE = f"{EXT_BASE}/clinragen-diagnostic-report"  # profiles/*.json, `install-profiles`
# HL7 AI Transparency on FHIR: the label on everything an AI asserted (meta.security)
AI_ASSERTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
               "code": "AIAST", "display": "Artificial Intelligence asserted"}
SITE_ID_SYSTEM = "urn:clinragen-fhir:site"
DISCLAIMER = ("Preliminary, machine-generated decision support: not a diagnosis. "
              "A clinician must review the cited values before acting.")


@dataclass(frozen=True)
class InputRef:
    """An input resource and the version that was read."""

    reference: str  # "Observation/<id>"
    version_id: str  # meta.versionId ("" when the server gave none): for `_history` references
    stamp: str = ""  # input_stamp(): tells versions apart in the report key without a versionId

    def versioned(self) -> str:
        return f"{self.reference}/_history/{self.version_id}" if self.version_id \
            else self.reference


def input_stamp(resource: Mapping[str, Any]) -> str:
    """The version of an input as read: meta.versionId, else meta.lastUpdated, else a hash of
    its content. Servers without versioning would otherwise give an edited input the same report
    key as before, so the edit never got a report."""
    meta = resource.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("versionId"):
        return str(meta["versionId"])
    if meta.get("lastUpdated"):
        return f"lastUpdated:{meta['lastUpdated']}"
    blob = json.dumps(resource, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def report_key(patient_id: str, inputs: Sequence[InputRef], prediction: Prediction) -> str:
    """Deterministic identity of a report: same patient, inputs and method -> same key.

    An input's version is its versionId (keys stay as they were where servers send one), else
    its stamp."""
    h = hashlib.sha256()
    h.update(f"Patient/{patient_id}\n".encode())
    for ref in sorted(inputs, key=lambda r: r.reference):
        h.update(f"{ref.reference}|{ref.version_id or ref.stamp}\n".encode())
    h.update(f"{prediction.method}|{prediction.method_version}|"
             f"{prediction.knowledge_version}".encode())
    return h.hexdigest()


def site_organization(settings: ReportSettings) -> dict[str, Any]:
    """The site's Organization as a Reference, from `report.organization_*`; unconfigured: an
    identifier-only reference `urn:clinragen-fhir:site|unconfigured` (nothing is refused)."""
    ref: dict[str, Any] = {"type": "Organization"}
    if settings.organization_reference:
        ref["reference"] = settings.organization_reference
    if settings.organization_identifier:
        system, _, value = settings.organization_identifier.partition("|")
        ref["identifier"] = {"system": system, "value": value}
    if not settings.organization_reference and not settings.organization_identifier:
        ref["identifier"] = {"system": SITE_ID_SYSTEM, "value": "unconfigured"}
    if settings.organization_name:
        ref["display"] = settings.organization_name
    return ref


def cited_results(prediction: Prediction) -> list[dict[str, str]]:
    """`result`: the Observations the evidence cites (each once), by versioned reference."""
    refs = (f"{e.reference}/_history/{e.version_id}" if e.version_id else e.reference
            for d in prediction.diagnoses for e in d.evidence
            if e.reference.startswith("Observation/"))
    return [{"reference": r} for r in dict.fromkeys(refs)]


def cited_values(prediction: Prediction, labs: pd.DataFrame | None) -> list[dict[str, Any]]:
    """One extension per cited lab reading: its versioned source and the value as sent.

    `clinragen-fhir audit` compares these with the server's current data, so a report can be
    re-checked without re-running the method (the canonical value is in the rationale).
    """
    raw: dict[tuple[str, str], tuple[float, str]] = {}
    if labs is not None and not labs.empty:
        for ref, loinc, value, unit in labs[["observation_id", "loinc", "raw_value",
                                             "raw_unit"]].itertuples(index=False):
            raw[(str(ref), str(loinc))] = (float(value), str(unit))
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for d in prediction.diagnoses:
        for e in d.evidence:
            if e.value is None or not e.reference.startswith("Observation/") or \
                    (e.reference, e.version_id, e.loinc) in seen:
                continue
            seen.add((e.reference, e.version_id, e.loinc))
            value, unit = raw.get((e.reference, e.loinc), (e.value, e.unit))
            ref = f"{e.reference}/_history/{e.version_id}" if e.version_id else e.reference
            out.append({"url": f"{EXT_BASE}/cited-value", "extension": [
                {"url": "source", "valueString": ref},
                {"url": "code", "valueCoding": {"system": "http://loinc.org", "code": e.loinc,
                                                "display": e.display}},
                {"url": "value", "valueQuantity": {"value": value, "unit": unit}},
                {"url": "time", "valueDateTime": e.time}]})
    return out


def build_transaction(
    patient_id: str,
    prediction: Prediction,
    used: Sequence[InputRef],
    skipped: Sequence[Skip],
    settings: ReportSettings,
    now: datetime | None = None,
    effective: datetime | None = None,
    labs: pd.DataFrame | None = None,
    claims: Sequence[ClaimCheck] = (),
    patient: Mapping[str, Any] | None = None,
    fact_labels: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], str]:
    """The transaction Bundle to POST, and the report identifier value it carries.

    `labs` (the lab frame) gives the trend charts and the as-sent values of cited readings;
    the identifier does not depend on it or on the rendering. `claims`: the rationale's lab
    claims checked against the record (`check_report_rationale`), shown to the reader and kept
    as an extension for auditors. `patient` (the Patient resource read in this run) gives the
    page's identification header; `fact_labels` (`report.html.fact_labels`) names the knowledge
    facts. Neither changes the identifier.
    """
    now = now or datetime.now(UTC)
    key = report_key(patient_id, used, prediction)
    trends = lab_trends(labs, (e.loinc for d in prediction.diagnoses for e in d.evidence))
    check = claims_summary(claims, prediction.rationale)
    header = patient_header(patient or {"id": patient_id})
    page = render_html(prediction, trends, issued=now, report_key=key, claims=check,
                       patient=header, labels=fact_labels)
    identifier = {"system": settings.identifier_system, "value": key}
    software = f"{prediction.method}@{prediction.method_version}"
    device_urn, report_urn = f"urn:uuid:{_uuid(key, 'device')}", f"urn:uuid:{_uuid(key, 'dr')}"
    device = {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_ID_SYSTEM, "value": software}],
        "deviceName": [{"name": f"{SOFTWARE} {__version__} ({software})", "type": "model-name"}],
        "version": [{"value": __version__}, {"value": prediction.method_version}],
        "status": "active",
    }
    site = site_organization(settings)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {"profile": [PROFILE], "security": [AI_ASSERTED]},
        "identifier": [identifier],
        "status": "preliminary",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "decision-support",
                                  "display": "Machine-generated decision support"}]}],
        "code": {"coding": [{"system": settings.code_system, "code": settings.code,
                             "display": settings.code_display}],
                 "text": "ClinRaGen diagnosis with rationale"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": (effective or now).isoformat(),
        "issued": now.isoformat(),
        "performer": [site],
        "result": cited_results(prediction),
        "conclusion": prediction.rationale,
        "conclusionCode": [{"extension": [{"url": f"{EXT_BASE}/probability",
                                           "valueDecimal": round(float(d.probability), 4)}],
                            "coding": [{"system": SNOMED, "code": d.snomed, "display": d.term}]}
                           for d in prediction.diagnoses],
        "presentedForm": [presented_form(page, now)],
        "text": {"status": "generated", "div": narrative_div(prediction, check, header)},
        "extension": [
            {"url": f"{EXT_BASE}/method", "valueString": software},
            {"url": f"{EXT_BASE}/knowledge-version", "valueString": prediction.knowledge_version},
            *cited_values(prediction, labs),
            claims_extension(claims, prediction.rationale),
        ],
    }
    entities: list[dict[str, Any]] = [
        {"role": "source", "what": {"reference": ref.versioned()}} for ref in used]
    entities += [{"role": "source", "what": {"reference": s.reference},
                  "extension": [{"url": f"{EXT_BASE}/skip-reason", "valueString": s.reason}]}
                 for s in skipped]
    provenance = {
        "resourceType": "Provenance",
        "id": f"clinragen-{key[:48]}",
        "meta": {"security": [AI_ASSERTED]},
        "target": [{"reference": report_urn}],
        "recorded": now.isoformat(),
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE"}]},
        "agent": [{"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
            "code": "author"}]}, "who": {"reference": device_urn, "display": software},
            "onBehalfOf": site}],  # provenance-1: a Device agent acts on someone's behalf
        "entity": entities,
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": device_urn, "resource": device,
             "request": {"method": "POST", "url": "Device",
                         "ifNoneExist": f"identifier={DEVICE_ID_SYSTEM}|{software}"}},
            {"fullUrl": report_urn, "resource": report,
             "request": {"method": "POST", "url": "DiagnosticReport",
                         "ifNoneExist": f"identifier={identifier['system']}|{key}"}},
            {"resource": provenance,
             "request": {"method": "PUT", "url": f"Provenance/{provenance['id']}"}},
        ],
    }
    return bundle, key


def claims_summary(claims: Sequence[ClaimCheck], rationale: str) -> str:
    """One sentence on the rationale's lab claims, for the narrative and the HTML page."""
    if not rationale.strip():
        return ""
    if not claims:
        return ("The rationale makes no lab claim (test with value, date or direction) that "
                "could be checked against the record.")
    held = sum(c.matched for c in claims)
    text = f"{held} of {len(claims)} lab claims in the rationale match this patient's record."
    wrong = [f"\u201c{claim_text(c, rationale)}\u201d ({c.reason})" for c in claims
             if not c.matched][:5]
    return text + (" Not matching: " + "; ".join(wrong) + "." if wrong else "")


def claims_extension(claims: Sequence[ClaimCheck], rationale: str) -> dict[str, Any]:
    """`rationale-lab-claims`: counts and every unmatched claim with why, for `audit`."""
    return {"url": f"{EXT_BASE}/rationale-lab-claims", "extension": [
        {"url": "claims", "valueInteger": len(claims)},
        {"url": "matched", "valueInteger": sum(c.matched for c in claims)},
        *({"url": "unmatched", "valueString": f"{claim_text(c, rationale)}: {c.reason}"}
          for c in claims if not c.matched)]}


def _uuid(key: str, salt: str) -> str:
    d = hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:32]}"
