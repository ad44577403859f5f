"""Human-readable renderings of a Prediction: a standalone HTML page and a FHIR narrative.

Clinicians read `DiagnosticReport.presentedForm` (text/html) and `text.div`, not JSON. Both are
built here from the same data, every string escaped, and both open with the patient's name, birth
date and identifier (from the Patient resource read in the same run), because a printed or mailed
report without them invites wrong-patient errors. The HTML page is self-contained (inline CSS
and a hand-written SVG trend chart per lab, report/trends.py; no script, no external resource,
a CSP that forbids loading any), so it can be opened from a mail or an EHR viewer safely. The
narrative keeps to the FHIR xhtml subset (no SVG, no script, no style sheets; `style`
attributes only).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from rdflib import URIRef

from clinragen_fhir import __version__
from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.knowledge.graph import CRG, KnowledgeGraph
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction
from clinragen_fhir.report.markup import esc
from clinragen_fhir.report.problem_list import (
    KNOWN,
    MATCHING,
    NOT_CHECKED,
    SUSPECTED,
    grouped,
    since_text,
)
from clinragen_fhir.report.trends import Trend, as_number, trend_svg

BANNER = "Preliminary \u2014 decision support, not a diagnosis"
BANNER_DETAIL = ("Machine-generated from the cited values by ClinRaGen-FHIR. A clinician must "
                 "review the cited values before acting.")
MAX_NARRATIVE_ROWS = 40  # cited values listed in the narrative (the HTML lists all)
# One name for the head's number, everywhere a reader sees it (it was "probability" in the table
# and "support" in the section headings).
PROBABILITY = "model probability"
PROBLEM_LIST_NOTE = ("Not compared with the patient's problem list: a disorder listed here may "
                     "already be a known Condition.")
# the sections by problem-list status (report.problem_list): suspected first, they are news
HEADINGS = {SUSPECTED: "Suspected, not on the problem list",
            KNOWN: "Known (on the problem list)",
            NOT_CHECKED: "Concluded disorders (problem list not checked)",
            "": "Suspected disorders"}




def fmt(value: float | None) -> str:
    """A value as the rationale and the prompt write it (`encoding.numbers.format_value`: 3
    significant digits below 1000, the whole number from 1000 up, never an exponent), so a
    reading the rationale cites reads the same in the evidence table."""
    return format_value(value)


@dataclass(frozen=True)
class PatientHeader:
    """Who the report is about, as printed on it: read from the Patient resource at write time."""

    name: str
    birth_date: str
    identifier: str  # e.g. "MRN 1234" (type and value of the medical record number)
    gender: str = ""
    reference: str = ""  # "Patient/<id>"

    def line(self) -> str:
        """One line of plain text: for the narrative and the footer."""
        return "; ".join(p for p in (self.name, f"born {self.birth_date}", self.identifier,
                                     self.gender, self.reference) if p)


NO_NAME, NO_BIRTH_DATE, NO_IDENTIFIER = ("name not recorded", "not recorded",
                                         "no identifier recorded")


def _name(resource: Mapping[str, Any]) -> str:
    names = [n for n in resource.get("name") or [] if isinstance(n, Mapping)]
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if name is None:
        return ""
    if name.get("text"):
        return str(name["text"]).strip()
    given = " ".join(str(g) for g in name.get("given") or [] if g)
    family = str(name.get("family") or "")
    return f"{family.upper()}, {given}".strip(", ") if family else given


def _identifier(resource: Mapping[str, Any]) -> str:
    """The medical record number if the Patient has one, else its first identifier."""
    ids = [i for i in resource.get("identifier") or []
           if isinstance(i, Mapping) and i.get("value")]
    if not ids:
        return ""

    def kind(i: Mapping[str, Any]) -> str:
        t = i.get("type") or {}
        codes = [c.get("code") for c in t.get("coding") or [] if isinstance(c, Mapping)]
        return "MRN" if "MR" in codes else str(t.get("text") or (codes[0] if codes else "")
                                             or "ID")

    best = next((i for i in ids if kind(i) == "MRN"), ids[0])
    return f"{kind(best)} {best['value']}"


def patient_header(resource: Mapping[str, Any] | None) -> PatientHeader:
    """The header of a Patient resource; what is missing is said so, never left blank."""
    resource = resource or {}
    pid = str(resource.get("id") or "")
    return PatientHeader(_name(resource) or NO_NAME,
                         str(resource.get("birthDate") or "") or NO_BIRTH_DATE,
                         _identifier(resource) or NO_IDENTIFIER,
                         str(resource.get("gender") or ""), f"Patient/{pid}" if pid else "")


_POLARITY = {"supports": "supports", "opposes": "argues against"}


def fact_labels(kg: KnowledgeGraph, prediction: Prediction,
                labs: pd.DataFrame | None = None) -> dict[str, str]:
    """A readable label for each knowledge fact the prediction used (its id stays the key).

    Associations have no label of their own, so they read as "finding supports disorder (source)"
    from their parts' skos:prefLabel / rdfs:label. The model also cites compound ids:
    "<finding>|<Observation>" reads as the finding and the reading (from `labs`), and
    "<source>|<note span>" as the source and the span."""
    ids = dict.fromkeys([*prediction.facts_used,
                         *(k for d in prediction.diagnoses for k in d.knowledge)])
    readings: dict[str, str] = {}
    if labs is not None and not labs.empty:
        for ref, display, loinc, value, unit, t in labs[
                ["observation_id", "display", "loinc", "value", "unit", "time"]].itertuples(
                index=False):
            readings[str(ref)] = (f"{display or loinc} {fmt(as_number(value))} {unit} on "
                                  f"{pd.Timestamp(t).date().isoformat()}")
    return {uri: _fact_label(kg, uri, readings) for uri in ids}


def _fact_label(kg: KnowledgeGraph, fact: str, readings: Mapping[str, str]) -> str:
    head, _, tail = fact.partition("|")
    if tail:  # a reading of a finding, or a note span of the note rule
        doc, _, span = tail.partition("#")
        what = readings.get(tail) or (f"{doc}, characters {span}" if span else tail)
        return f"{kg.label(head)}: {what}"
    g, node = kg.graph, URIRef(fact)
    finding, disorder = g.value(node, CRG.finding), g.value(node, CRG.disorder)
    if finding is None or disorder is None:
        return kg.label(fact)
    polarity = str(g.value(node, CRG.polarity) or "supports")
    source = g.value(node, CRG.source)
    return (f"{kg.label(str(finding))} {_POLARITY.get(polarity, polarity)} "
            f"{kg.label(str(disorder))}"
            + (f" ({kg.label(str(source))})" if source is not None else ""))




def _evidence_rows(evidence: Sequence[Evidence]) -> str:
    rows = []
    for e in evidence:
        ref = f"{e.reference}/_history/{e.version_id}" if e.version_id else e.reference
        rows.append(f'<tr><td class="date">{esc(e.time[:10])}</td>'
                    f"<td>{esc(e.display or e.loinc)}</td>"
                    f'<td class="num">{esc(fmt(e.value))}</td><td>{esc(e.unit)}</td>'
                    f"<td>{esc(e.statement)}</td><td><code>{esc(ref)}</code></td></tr>")
    return "".join(rows)


def _facts(ids: Iterable[str], labels: Mapping[str, str]) -> str:
    """List items showing each fact by its label; the id stays on hover for auditors."""
    return "".join(f'<li title="{esc(k)}">{esc(labels.get(k) or k)}</li>' for k in ids)


def _diagnosis_section(d: Diagnosis, trends: Mapping[str, Trend],
                       labels: Mapping[str, str]) -> str:
    cited = {e.reference for e in d.evidence}
    charts = "".join(
        f'<figure>{trend_svg(trends[c], cited)}<figcaption>{esc(trends[c].display)} '
        f"({esc(trends[c].unit)}), {len(trends[c].points)} readings "
        f"{esc(trends[c].points[0].time[:10])} to {esc(trends[c].points[-1].time[:10])}; "
        "red: cited readings; green band: reference range</figcaption></figure>"
        for c in dict.fromkeys(e.loinc for e in d.evidence) if c in trends)
    table = ("<table><thead><tr><th>date</th><th>lab</th><th>value</th><th>unit</th>"
             "<th>why it counts</th><th>source (version)</th></tr></thead>"
             f"<tbody>{_evidence_rows(d.evidence)}</tbody></table>") if d.evidence else \
        "<p>No cited values.</p>"
    facts = _facts(d.knowledge, labels)
    return (f'<section class="dx"><h2>{esc(d.term)} <small>SNOMED CT {esc(d.snomed)}; '
            f"{PROBABILITY} {d.probability:.0%}; {esc(status_text(d))}</small></h2>"
            f"<h3>Cited values</h3>{table}"
            + (f'<h3>Trends</h3><div class="charts">{charts}</div>' if charts else "")
            + (f"<h3>Knowledge used</h3><ul>{facts}</ul>" if facts else "")
            + "</section>")


def status_text(d: Diagnosis) -> str:
    """The disorder against the problem list, in words: 'suspected, not on the problem list',
    'known: on the problem list since 2019-04-02 (as Type 2 diabetes mellitus)', 'problem list
    not checked'."""
    p = d.problem
    if p is None:
        return "not compared with the problem list"
    if p.status == KNOWN:
        listed = f" (as {p.display or p.code})" if p.code and p.code != d.snomed else ""
        return f"known: {since_text(p)}{listed}"
    if p.status == SUSPECTED:
        return "suspected, not on the problem list"
    return "problem list not checked"


def withheld_text(prediction: Prediction) -> str:
    """The disorders the limit of codes per report left out, in words: above their thresholds,
    so a clinician reading the three concluded ones still sees what else the record supports."""
    names = "; ".join(f"{w.term} ({w.probability:.0%})" for w in prediction.withheld)
    return (f"Also above its threshold, not concluded (the report concludes at most "
            f"{len(prediction.diagnoses)} codes, those the record raises most above how often "
            f"they occur): {names}.")


def _not_checked_note(diagnoses: Sequence[Diagnosis]) -> str:
    reason = next((d.problem.reason for d in diagnoses if d.problem and d.problem.reason), "")
    return (f"Problem list not checked{f' ({reason})' if reason else ''}: a disorder listed "
            "here may already be a known Condition.")


def _status_groups(prediction: Prediction) -> list[tuple[str, str, list[Diagnosis]]]:
    """(heading, note under it, diagnoses) per problem-list status, suspected first."""
    out = []
    for status, group in grouped(prediction.diagnoses):
        note = {"": PROBLEM_LIST_NOTE, NOT_CHECKED: _not_checked_note(group),
                KNOWN: f"Matched against the active Conditions: {MATCHING}."}.get(status, "")
        out.append((HEADINGS[status], note, group))
    return out


def _patient_block(patient: PatientHeader) -> str:
    """The identification header: large, first, and marked where something is missing."""
    def cell(label: str, value: str, missing: bool) -> str:
        cls = ' class="missing"' if missing else ""
        return f"<div><span>{esc(label)}</span><b{cls}>{esc(value)}</b></div>"

    return ('<header class="patient" aria-label="patient identification">'
            + cell("Patient", patient.name, patient.name == NO_NAME)
            + cell("Born", patient.birth_date, patient.birth_date == NO_BIRTH_DATE)
            + cell("Identifier", patient.identifier, patient.identifier == NO_IDENTIFIER)
            + (cell("Sex", patient.gender, False) if patient.gender else "")
            + (cell("Record", patient.reference, False) if patient.reference else "")
            + "</header>")


CSS = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:60em;color:#222}"
       ".patient{display:flex;flex-wrap:wrap;gap:.4em 2em;border:2px solid #333;"
       "padding:.5em 1em;margin-bottom:.8em}"
       ".patient span{display:block;font-size:.75em;color:#555;text-transform:uppercase}"
       ".patient b{font-size:1.15em}.patient b.missing{color:#a00;font-style:italic}"
       ".banner{background:#fff3cd;border:2px solid #e0a800;padding:.6em 1em;font-weight:bold}"
       ".banner span{display:block;font-weight:normal;font-size:.9em}"
       "table{border-collapse:collapse;margin:.5em 0;font-size:.9em}"
       "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
       "td.num{text-align:right}td.date{white-space:nowrap}small{font-weight:normal;color:#555}"
       ".charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}"
       "figcaption{font-size:.8em;color:#555;max-width:420px}"
       "footer{margin-top:2em;font-size:.85em;color:#555}")


def render_html(prediction: Prediction, trends: Mapping[str, Trend], *, issued: datetime,
                report_key: str = "", claims: str = "", patient: PatientHeader | None = None,
                labels: Mapping[str, str] | None = None) -> str:
    """The whole report as one self-contained HTML page.

    `patient`: the identification header (a page without one says so in it); `labels`: fact id
    -> readable label (`fact_labels`), ids are shown where a label is missing."""
    patient = patient or patient_header(None)
    labels = labels or {}
    if prediction.diagnoses:
        # One table per problem-list status (report.problem_list): suspected first; a list that
        # was not read says so rather than calling every disorder suspected.
        conclusion = ""
        for heading, note, group in _status_groups(prediction):
            known = group[0].problem is not None and group[0].problem.status == KNOWN
            summary = "".join(
                f"<tr><td>{esc(d.term)}</td><td>{esc(d.snomed)}</td>"
                f'<td class="num">{d.probability:.0%}</td>'
                f'<td class="num">{len(d.evidence)}</td>'
                + (f"<td>{esc(status_text(d).removeprefix('known: on the problem list '))}</td>"
                   if known else "")
                + "</tr>" for d in group)
            conclusion += (f"<h2>{esc(heading)}</h2>"
                           "<table><thead><tr><th>diagnosis</th><th>SNOMED CT</th>"
                           f"<th>{PROBABILITY}</th><th>cited values</th>"
                           + ("<th>problem list</th>" if known else "") + "</tr></thead>"
                           f"<tbody>{summary}</tbody></table>"
                           + (f"<p><small>{esc(note)}</small></p>" if note else ""))
        if prediction.method == "knowledge-rule-baseline":  # no calibrated model behind it
            conclusion += (f"<p><small>For the knowledge-rule baseline, the {PROBABILITY} is "
                           "the knowledge graph rules' score, not a calibrated probability."
                           "</small></p>")
    else:
        conclusion = "<p><b>No disorder supported.</b></p>"
    if prediction.withheld:
        conclusion += f"<p><small>{esc(withheld_text(prediction))}</small></p>"
    if prediction.abstained:
        conclusion += f"<p>Abstained: {esc(prediction.abstain_reason)}</p>"
    sections = "".join(_diagnosis_section(d, trends, labels) for d in prediction.diagnoses)
    facts = _facts(prediction.facts_used, labels)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ClinRaGen report (preliminary): {esc(patient.name)}</title>"
        f"<style>{CSS}</style></head><body>{_patient_block(patient)}"
        f'<div class="banner" role="alert">{esc(BANNER)}<span>{esc(BANNER_DETAIL)}</span></div>'
        f"<h1>Diagnostic decision support</h1>{conclusion}"
        f"<h2>Rationale</h2><p>{_lines(prediction.rationale)}</p>"
        + (f"<p><small>Checked: {esc(claims)}</small></p>" if claims else "") + f"{sections}"
        + (f"<h2>All knowledge facts used</h2><ul>{facts}</ul>" if facts else "")
        + f"<footer><p>Patient: {esc(patient.line())}.</p>"
        f"<p>Method {esc(prediction.method)} version {esc(prediction.method_version)}; "
        f"knowledge {esc(prediction.knowledge_version)}; ClinRaGen-FHIR {esc(__version__)}.</p>"
        f"<p>Issued {esc(issued.isoformat())}"
        + (f"; report identifier <code>{esc(report_key)}</code>" if report_key else "")
        + "</p></footer></body></html>")


def narrative_div(prediction: Prediction, claims: str = "",
                  patient: PatientHeader | None = None) -> str:
    """`DiagnosticReport.text.div`: the same content within the FHIR narrative xhtml subset."""
    patient = patient or patient_header(None)
    if prediction.diagnoses:
        conclusion = ""
        for heading, note, group in _status_groups(prediction):
            rows = "".join(f"<tr><td>{esc(d.term)}</td><td>{esc(d.snomed)}</td>"
                           f"<td>{d.probability:.0%}</td><td>{esc(status_text(d))}</td></tr>"
                           for d in group)
            conclusion += (f"<p><b>{esc(heading)}</b></p><table><tr><th>diagnosis</th>"
                           f"<th>SNOMED CT</th><th>{PROBABILITY}</th><th>problem list</th></tr>"
                           f"{rows}</table>" + (f"<p>{esc(note)}</p>" if note else ""))
    else:
        conclusion = "<p>No disorder supported.</p>"
    if prediction.withheld:
        conclusion += f"<p>{esc(withheld_text(prediction))}</p>"
    evidence = [e for d in prediction.diagnoses for e in d.evidence]
    cited = "".join(
        f"<tr><td>{esc(e.time[:10])}</td><td>{esc(e.display or e.loinc)}</td>"
        f"<td>{esc(f'{fmt(e.value)} {e.unit}' if e.value is not None else e.statement)}</td>"
        f"<td>{esc(e.reference)}</td></tr>"
        for e in list(dict.fromkeys(evidence))[:MAX_NARRATIVE_ROWS])
    more = len(set(evidence)) - MAX_NARRATIVE_ROWS
    cited_html = (("<p><b>Cited values</b></p><table><tr><th>date</th><th>lab</th>"
                   f"<th>value</th><th>source</th></tr>{cited}</table>")
                  + (f"<p>and {more} more (see the attached HTML report)</p>" if more > 0 else "")
                  ) if cited else ""
    return ('<div xmlns="http://www.w3.org/1999/xhtml">'
            f'<p style="font-weight:bold">Patient: {esc(patient.line())}</p>'
            f'<p style="font-weight:bold">{esc(BANNER)}. {esc(BANNER_DETAIL)}</p>'
            f"{conclusion}<p>{_lines(prediction.rationale, '<br/>')}</p>"
            + (f"<p>Checked: {esc(claims)}</p>" if claims else "") + f"{cited_html}"
            f"<p>Knowledge facts used: {len(prediction.facts_used)}. Method "
            f"{esc(prediction.method)} {esc(prediction.method_version)}; knowledge "
            f"{esc(prediction.knowledge_version)}; ClinRaGen-FHIR {esc(__version__)}.</p></div>")


def presented_form(page: str, issued: datetime) -> dict[str, Any]:
    """The FHIR Attachment carrying the HTML page."""
    data = page.encode("utf-8")
    return {"contentType": "text/html; charset=utf-8", "language": "en",
            "data": base64.b64encode(data).decode("ascii"), "size": len(data),
            "title": "ClinRaGen report (preliminary decision support)",
            "creation": issued.isoformat()}


def decode_presented_form(report: Mapping[str, Any]) -> str | None:
    """The HTML page carried by a DiagnosticReport, if any (for the CLI and the demo)."""
    for form in report.get("presentedForm", []) or []:
        if str(form.get("contentType", "")).startswith("text/html") and form.get("data"):
            return base64.b64decode(form["data"]).decode("utf-8")
    return None


def _lines(text: str, br: str = "<br>") -> str:
    """Escaped text with its line breaks kept: the rationale has one line per diagnosis."""
    return br.join(esc(line) for line in text.split("\n"))
