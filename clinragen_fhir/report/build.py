"""A Prediction -> one transaction Bundle: DiagnosticReport + Provenance (+ the software Device).

One current report per patient and method (the report lifecycle, docs/integration.md): its
identifier `current_key(patient, method)` is written by conditional update
(`PUT DiagnosticReport?identifier=...`), so each write is a new version of the same resource and
older conclusions stay readable in `_history`. The report carries `content_fingerprint` (the
concluded diagnoses, their evidence and the model's identity) in an extension: the pipeline
writes only when that changes. The Provenance of each version has an id derived from the key and
the fingerprint and is written by PUT, so a retried write never duplicates it.

`report_key` (a hash of every input's version) was the identifier before the lifecycle; reports
carrying one (`is_legacy_key`) are adopted or linked as revised, never duplicated.
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
    narrative_div,
    patient_header,
    presented_form,
    render_html,
)
from clinragen_fhir.report.problem_list import extension as problem_extension
from clinragen_fhir.report.problem_list import fingerprint_part, known_conditions
from clinragen_fhir.report.trends import lab_trends

SOFTWARE = "ClinRaGen-FHIR"
EXT_BASE = "https://clinragen-fhir.org/StructureDefinition"
DEVICE_ID_SYSTEM = "urn:clinragen-fhir:software"
MODEL_EXT = f"{EXT_BASE}/model-identity"  # identity.model_identity of what concluded
FINGERPRINT_EXT = f"{EXT_BASE}/content-fingerprint"  # content_fingerprint: a change writes
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


def current_key(patient_id: str, method: str) -> str:
    """The identifier value of the one current report for this patient and method:
    `<method>:<32 hex of sha256("Patient/<id>")>`. Opaque in the patient, so task results and
    logs that carry it never carry a patient id (the report's subject names the patient)."""
    digest = hashlib.sha256(f"Patient/{patient_id}".encode()).hexdigest()[:32]
    return f"{method}:{digest}"


def is_legacy_key(value: str) -> bool:
    """A `report_key` (64 hex digits): the identifier of a report from before the lifecycle."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def model_of(prediction: Prediction) -> str:
    """The model identity a report carries (identity.model_identity; baseline: rule-baseline)."""
    from clinragen_fhir.identity import RULE_BASELINE

    return prediction.model_id or RULE_BASELINE


def content_fingerprint(prediction: Prediction) -> str:
    """What a new version must differ in: the concluded diagnoses (in order), each one's
    evidence (source, version, test, value, unit, time) and the model (method, its version and
    `model_of`). Probabilities, the rationale's wording, rendering times and inputs not cited
    are left out: a new vital sign that changes no conclusion writes nothing. With the
    problem list read (`report.problem_list`), each disorder's known / suspected status, the
    Condition and its date count too: a disorder put on the list is a new version. The codes
    the report names as withheld (over the cap) count too."""
    body: dict[str, Any] = {
        "method": f"{prediction.method}@{prediction.method_version}",
        "model": model_of(prediction), "abstained": prediction.abstained,
        "diagnoses": [[d.snomed, [[e.reference, e.version_id, e.loinc, e.value, e.unit,
                                   e.time] for e in d.evidence]]
                      for d in prediction.diagnoses]}
    if prediction.withheld:  # what the report also names; absent: older reports keep theirs
        body["withheld"] = [w.snomed for w in prediction.withheld]
    problems = fingerprint_part(prediction)
    if problems is not None:  # absent when not read: reports written without it keep theirs
        body["problem_list"] = problems
    blob = json.dumps(body, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def stored_fingerprint(report: Mapping[str, Any]) -> str:
    """The content fingerprint a stored report carries ("" for reports from before it)."""
    return next((str(e.get("valueString", "")) for e in report.get("extension", []) or []
                 if e.get("url") == FINGERPRINT_EXT), "")


def provenance_id(key: str, fingerprint: str) -> str:
    """The Provenance id of one version of a report: the same content, the same Provenance."""
    return "clinragen-" + hashlib.sha256(f"{key}|{fingerprint}".encode()).hexdigest()[:48]


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
    report_id: str | None = None,
    revises: Sequence[str] = (),
    keep_identifiers: Sequence[Mapping[str, Any]] = (),
) -> tuple[dict[str, Any], str]:
    """The transaction Bundle to POST, and the report identifier value it carries.

    `labs` (the lab frame) gives the trend charts and the as-sent values of cited readings;
    the identifier does not depend on it or on the rendering. `claims`: the rationale's lab
    claims checked against the record (`check_report_rationale`), shown to the reader and kept
    as an extension for auditors. `patient` (the Patient resource read in this run) gives the
    page's identification header; `fact_labels` (`report.html.fact_labels`) names the knowledge
    facts. Neither changes the identifier.

    Lifecycle (docs/integration.md, "Report lifecycle"): the report is written by conditional
    update on `current_key`; `report_id` instead PUTs it onto that id (a legacy report adopted
    as the current one, keeping its identifiers `keep_identifiers`). `revises`: versioned
    references of the reports this version replaces, linked from its Provenance as entities
    of role `revision` (they stay as written, readable).
    """
    now = now or datetime.now(UTC)
    key = current_key(patient_id, prediction.method)
    fingerprint = content_fingerprint(prediction)
    trends = lab_trends(labs, (e.loinc for d in prediction.diagnoses for e in d.evidence))
    check = claims_summary(claims, prediction.rationale)
    header = patient_header(patient or {"id": patient_id})
    page = render_html(prediction, trends, issued=now, report_key=key, claims=check,
                       patient=header, labels=fact_labels)
    identifier = {"system": settings.identifier_system, "value": key}
    software = f"{prediction.method}@{prediction.method_version}"
    device_urn = f"urn:uuid:{stable_uuid(key, 'device')}"
    report_urn = f"urn:uuid:{stable_uuid(key, 'dr')}"
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
        "identifier": [identifier, *(dict(i) for i in keep_identifiers if i != identifier)],
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
                                           "valueDecimal": round(float(d.probability), 4)},
                                          *problem_extension(d.problem)],
                            "coding": [{"system": SNOMED, "code": d.snomed, "display": d.term}]}
                           for d in prediction.diagnoses],
        "presentedForm": [presented_form(page, now)],
        "text": {"status": "generated", "div": narrative_div(prediction, check, header)},
        "extension": [
            {"url": f"{EXT_BASE}/method", "valueString": software},
            {"url": f"{EXT_BASE}/knowledge-version", "valueString": prediction.knowledge_version},
            {"url": MODEL_EXT, "valueString": model_of(prediction)},
            {"url": FINGERPRINT_EXT, "valueString": fingerprint},
            *cited_values(prediction, labs),
            *withheld_extensions(prediction),
            claims_extension(claims, prediction.rationale),
        ],
    }
    if report_id:  # PUT by id: the body names the same id
        report["id"] = report_id
    entities: list[dict[str, Any]] = [
        {"role": "source", "what": {"reference": ref.versioned()}} for ref in used]
    entities += [{"role": "source", "what": {"reference": s.reference},
                  "extension": [{"url": f"{EXT_BASE}/skip-reason", "valueString": s.reason}]}
                 for s in skipped]
    # the Conditions that made a disorder "known" (report.problem_list) are inputs too
    entities += [{"role": "source", "what": {"reference": ref}}
                 for ref in known_conditions(prediction)]
    entities += [{"role": "revision", "what": {"reference": ref}} for ref in revises]
    provenance = {
        "resourceType": "Provenance",
        "id": provenance_id(key, fingerprint),
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
             "request": {"method": "PUT", "url": f"DiagnosticReport/{report_id}" if report_id
                         else f"DiagnosticReport?identifier={identifier['system']}|{key}"}},
            {"resource": provenance,
             "request": {"method": "PUT", "url": f"Provenance/{provenance['id']}"}},
        ],
    }
    return bundle, key


def withheld_extensions(prediction: Prediction) -> list[dict[str, Any]]:
    """One `withheld` extension per code the cap left out (`Prediction.withheld`): what the
    report's "also above its threshold" line says, for a machine reading it."""
    return [{"url": f"{EXT_BASE}/withheld",
             "valueCodeableConcept": {
                 "coding": [{"system": SNOMED, "code": w.snomed, "display": w.term}],
                 "text": f"{w.term}: model probability {w.probability:.0%}, above its "
                         "threshold, not concluded"}}
            for w in prediction.withheld]


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


def stable_uuid(key: str, salt: str) -> str:
    """A UUID derived from a report key: the same report's Device, report and event URNs on
    every run (so a retried transaction names the same resources)."""
    d = hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:32]}"
