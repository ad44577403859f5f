"""The card a clinician sees: the latest stored report (one FHIR search) as one CDS Hooks card,
suspected disorders first, the codes the report's cap left out, how many of its lab claims
hold, the disclaimer, and a link.
Server-held names are escaped so they cannot become Markdown links or markup."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.report.build import DISCLAIMER, EXT_BASE, SOFTWARE
from clinragen_fhir.report.problem_list import KNOWN, NOT_CHECKED, SUSPECTED, read_extension

MAX_DISORDERS = 3  # named in the summary; the rest are counted ("+2 more")


SUMMARY_CHARS = 140  # CDS Hooks: summary SHOULD be under 140 characters


OVERRIDE_SYSTEM = "https://clinragen-fhir.org/CodeSystem/cds-override-reason"


OVERRIDE_REASONS = {"already-known": "Already known or being addressed",
                    "not-relevant": "Not relevant to this visit",
                    "disagree": "Disagree with the suggested diagnoses"}


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()!|<>~])")  # what makes links, emphasis, HTML


def md(text: str) -> str:
    """Text for a Markdown field: server-held names must not become links or markup."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


# the card leads with what the clinician may not know: suspected, not on the problem list;
# "" is a report from before the problem-list check (its disorders read as suspected, as then)
_CARD_ORDER = (SUSPECTED, "", NOT_CHECKED, KNOWN)


_CARD_HEADINGS = {SUSPECTED: "Suspected, not on the problem list", "": "Suspected",
                  NOT_CHECKED: "Concluded (problem list not checked)",
                  KNOWN: "Known (on the problem list)"}


def disorders_by_status(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, problem-list status) of each concluded disorder (SNOMED display, else the code),
    suspected ones first, each group in the report's order; status "" on reports written
    before the problem-list check (`report.problem_list`'s extension)."""
    out: dict[str, str] = {}
    for cc in report.get("conclusionCode") or []:
        if not isinstance(cc, dict):
            continue
        for c in cc.get("coding") or []:
            if isinstance(c, dict) and c.get("system") == SNOMED and c.get("code"):
                status = read_extension(cc).get("status", "")
                out.setdefault(str(c.get("display") or cc.get("text") or c["code"]),
                               status if status in _CARD_ORDER else "")
                break
    return sorted(out.items(), key=lambda kv: _CARD_ORDER.index(kv[1]))


def disorders(report: Mapping[str, Any]) -> list[str]:
    """The report's concluded disorders, suspected ones first (`disorders_by_status`)."""
    return [name for name, _ in disorders_by_status(report)]


def withheld(report: Mapping[str, Any]) -> list[str]:
    """The names of the codes the report's cap left out (its `withheld` extensions: above their
    thresholds, not concluded), in the report's order."""
    out = []
    for ext in report.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == f"{EXT_BASE}/withheld":
            cc = ext.get("valueCodeableConcept")
            codings = cc.get("coding") if isinstance(cc, dict) else None
            c = codings[0] if isinstance(codings, list) and codings else None
            if isinstance(c, dict) and (c.get("display") or c.get("code")):
                out.append(str(c.get("display") or c.get("code")))
    return out


def claim_counts(report: Mapping[str, Any]) -> tuple[int, int] | None:
    """(matched, claims) from the `rationale-lab-claims` extension; None on older reports."""
    for ext in report.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == f"{EXT_BASE}/rationale-lab-claims":
            parts = {p.get("url"): p.get("valueInteger") for p in ext.get("extension") or []
                     if isinstance(p, dict)}
            claims, matched = parts.get("claims"), parts.get("matched")
            if isinstance(claims, int) and isinstance(matched, int):
                return matched, claims
    return None


def summary_of(names: list[str]) -> str:
    """The card's one line: at most MAX_DISORDERS names, the rest counted, under 140 chars."""
    shown, rest = names[:MAX_DISORDERS], len(names) - MAX_DISORDERS
    text = "ClinRaGen (preliminary): " + ", ".join(shown) + (f", +{rest} more" if rest > 0
                                                             else "")
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "\u2026"


def build_card(report: Mapping[str, Any], link: str, card_id: str) -> dict[str, Any]:
    """The CDS Hooks card for one stored report: suspected disorders first, then those whose
    problem list was not checked, then the known ones (already on the problem list)."""
    found = disorders_by_status(report)
    names = [f"{n} (known)" if status == KNOWN else n for n, status in found]
    shown = found[:MAX_DISORDERS]
    lines = [f"**{_CARD_HEADINGS[status]}:** " + "; ".join(md(n) for n, s in shown if s == status)
             for status in _CARD_ORDER if any(s == status for _, s in shown)]
    if len(found) > MAX_DISORDERS:
        lines[-1] += f" (and {len(found) - MAX_DISORDERS} more in the report)"
    also = withheld(report)
    if also:
        lines.append("**Also above its threshold, not concluded:** "
                     + "; ".join(md(n) for n in also))
    counts = claim_counts(report)
    if counts is not None:
        matched, claims = counts
        lines.append(f"**Rationale:** {matched} of {claims} lab claims checked match this "
                     "patient's record." if claims else
                     "**Rationale:** makes no lab claim that could be checked against the "
                     "record.")
    issued = str(report.get("issued") or "")[:10]
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", issued):
        lines.append(f"Report of {issued}, status {md(str(report.get('status', '')))}.")
    lines.append(DISCLAIMER)
    return {
        "uuid": card_id,
        "summary": summary_of(names),
        "detail": "\n\n".join(lines),
        "indicator": "info",
        "source": {"label": f"{SOFTWARE} (machine-generated, preliminary)"},
        "links": [{"label": "Open the ClinRaGen report", "url": link, "type": "absolute"}],
        "overrideReasons": [{"system": OVERRIDE_SYSTEM, "code": c, "display": d}
                            for c, d in OVERRIDE_REASONS.items()],
    }


def latest_report(client: FhirClient, patient_id: str, system: str) -> dict[str, Any] | None:
    """The newest report this software wrote for the patient (one search page), skipping ones
    withdrawn as entered in error or cancelled."""
    params = {"subject": f"Patient/{patient_id}", "identifier": f"{system}|",
              "_sort": "-_lastUpdated", "_count": 5}
    for page in client.search_pages("DiagnosticReport", params):
        for entry in page.get("entry") or []:
            r = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(r, dict) or r.get("resourceType") != "DiagnosticReport":
                continue
            if r.get("status") in ("entered-in-error", "cancelled"):
                continue
            if any(isinstance(i, dict) and i.get("system") == system
                   for i in r.get("identifier") or []):
                return r
        break  # newest first: a first page without one means none worth showing
    return None
