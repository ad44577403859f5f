"""The readable report: a self-contained HTML page and a FHIR-subset narrative, all escaped."""

from __future__ import annotations

import base64
import dataclasses
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import ClassVar

import pandas as pd

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction, Withheld
from clinragen_fhir.report.build import InputRef, build_transaction, current_key
from clinragen_fhir.report.html import (
    BANNER,
    NO_IDENTIFIER,
    NO_NAME,
    PROBABILITY,
    PROBLEM_LIST_NOTE,
    decode_presented_form,
    fact_labels,
    narrative_div,
    patient_header,
)
from clinragen_fhir.report.trends import lab_trends, trend_svg

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
EVIL = '<script>alert("x")</script> & <img src=https://evil.example/x.png>'
XHTML = "{http://www.w3.org/1999/xhtml}"
# FHIR narrative: basic HTML 4 formatting elements only (txt-1); what we emit must stay inside.
NARRATIVE_ELEMENTS = {"div", "p", "b", "i", "br", "table", "tr", "th", "td", "ul", "li", "span",
                      "code", "small", "h3"}


def labs() -> pd.DataFrame:
    rows = []
    for i, (v, t) in enumerate([(6.1, "2023-01-05"), (6.6, "2023-07-01"), (7.1, "2024-03-02")]):
        rows.append({"observation_id": f"Observation/a{i}", "version_id": "2", "loinc": "4548-4",
                     "display": "HbA1c", "category": "laboratory", "value": v, "unit": "%",
                     "raw_value": v, "raw_unit": "%", "time": pd.Timestamp(t, tz="UTC"),
                     "ref_low": 4.0, "ref_high": 5.6, "interpretation": ""})
    for i, (v, t) in enumerate([(7.0, "2023-02-01"), (8.2, "2024-03-02")]):
        rows.append({"observation_id": f"Observation/g{i}", "version_id": "1", "loinc": "2345-7",
                     "display": "Glucose", "category": "laboratory", "value": v * 18.016,
                     "unit": "mg/dL", "raw_value": v, "raw_unit": "mmol/L",
                     "time": pd.Timestamp(t, tz="UTC"), "ref_low": 70.0, "ref_high": 99.0,
                     "interpretation": ""})
    return pd.DataFrame(rows)


def prediction(term: str = "Diabetes mellitus type 2") -> Prediction:
    ev = (Evidence("Observation/a2", "2", "4548-4", "HbA1c", 7.1, "%", "2024-03-02T00:00:00+00:00",
                   "HbA1c 7.1 % on 2024-03-02 (>= 6.5 %)"),
          Evidence("Observation/a1", "2", "4548-4", "HbA1c", 6.6, "%", "2023-07-01T00:00:00+00:00",
                   "HbA1c 6.6 % on 2023-07-01"),
          Evidence("Observation/g1", "1", "2345-7", "Glucose", 147.7, "mg/dL",
                   "2024-03-02T00:00:00+00:00", "Glucose 147.7 mg/dL on 2024-03-02"),
          Evidence("DocumentReference/d1", "", "", "note", None, "", "",
                   'note mentions "diabetes" (characters 10-18)'))
    return Prediction("knowledge-rule-baseline", "1", "kg-abc",
                      [Diagnosis("44054006", term, 0.87, ev, ("https://kg/fact/1", "fnd:a1c"))],
                      f"HbA1c was 7.1 % on 2024-03-02 (>= 6.5 %). {EVIL}",
                      facts_used=["https://kg/fact/1", "fnd:a1c"])


# A Patient as Synthea writes it (official and maiden names, MRN beside SSN), one name escaped.
PATIENT = {"resourceType": "Patient", "id": "p1", "birthDate": "1961-04-12", "gender": "female",
           "name": [{"use": "maiden", "family": "Becker968", "given": ["Ann"]},
                    {"use": "official", "family": "Bosco<b>882</b>", "given": ["Celinda", "V."]}],
           "identifier": [
               {"system": "https://github.com/synthetichealth/synthea", "value": "p1-uuid"},
               {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                     "code": "SS"}]}, "value": "999-78-4665"},
               {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                     "code": "MR"}], "text": "Medical Record Number"},
                "system": "http://hospital.example", "value": "MRN-0042"}]}
USED = [InputRef("Observation/a2", "2"), InputRef("Observation/a1", "2"),
        InputRef("Observation/g1", "1"), InputRef("DocumentReference/d1", "1")]


class _Tags(HTMLParser):
    """Collects tags and attributes, and checks that non-void elements are closed in order."""

    VOID: ClassVar[set[str]] = {"meta", "br", "img", "link", "input", "hr", "rect", "circle",
                                "polyline"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def page(pred: Prediction | None = None, patient: dict[str, object] | None = None,
         labels: dict[str, str] | None = None) -> tuple[str, dict[str, object], str]:
    bundle, key = build_transaction("p1", pred or prediction(), USED, [], ReportSettings(),
                                    now=NOW, labs=labs(), patient=patient, fact_labels=labels)
    report = bundle["entry"][1]["resource"]
    html = decode_presented_form(report)
    assert html is not None
    return html, report, key


def test_presented_form_is_a_complete_escaped_page() -> None:
    html, report, key = page()
    form = report["presentedForm"][0]
    assert form["contentType"].startswith("text/html")
    assert form["size"] == len(base64.b64decode(form["data"]))
    assert report["status"] == "preliminary"
    assert BANNER in html and "decision support" in html
    assert "Diabetes mellitus type 2" in html and "44054006" in html and "87%" in html
    assert "HbA1c 7.1 % on 2024-03-02 (&gt;= 6.5 %)" in html  # cited statement, escaped
    assert "Observation/a2/_history/2" in html  # the versioned source of each cited value
    assert "https://kg/fact/1" in html and "fnd:a1c" in html  # knowledge facts used
    assert "knowledge-rule-baseline" in html and "kg-abc" in html and key in html
    # The untrusted text appears only escaped: no script, no image, no external load.
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    parser = _Tags()
    parser.feed(html)
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    assert {"script", "iframe", "object", "embed", "link", "img"}.isdisjoint(parser.tags)
    assert not [a for a, v in parser.attrs if a in ("src", "href") or a.startswith("on")]
    assert "url(" not in html and "@import" not in html
    assert "default-src 'none'" in html  # CSP: nothing can be loaded even if injected


def test_one_trend_chart_per_lab_that_drove_the_conclusion() -> None:
    html, _, _ = page()
    assert html.count("<svg") == 2  # HbA1c and glucose; the note has no chart
    svg = html[html.index("<svg"):html.index("</svg>") + 6]
    root = ET.fromstring(svg)  # each chart is well-formed SVG/XML on its own
    ns = "{http://www.w3.org/2000/svg}"
    circles = root.findall(f"{ns}circle")
    assert len(circles) == 3  # all HbA1c readings, oldest first
    cited = [c for c in circles if c.get("fill") == "#c62828"]
    assert len(cited) == 2  # the two cited readings are marked
    cx = [float(c.get("cx", 0)) for c in circles]
    assert cx == sorted(cx)
    cy = [float(c.get("cy", 0)) for c in circles]
    assert cy[0] > cy[1] > cy[2]  # rising values are drawn higher
    assert root.find(f"{ns}polyline") is not None
    assert root.find(f"{ns}rect[@fill='#e3f2e1']") is not None  # reference range band


def test_trend_of_a_single_reading_and_flat_values_draws() -> None:
    frame = labs().iloc[:1].assign(value=5.0)
    trends = lab_trends(frame, ["4548-4", "0000-0"])
    assert list(trends) == ["4548-4"]
    svg = trend_svg(trends["4548-4"])
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}circle")) == 1


def test_narrative_is_well_formed_fhir_xhtml_subset() -> None:
    _, report, _ = page()
    div = report["text"]["div"]
    root = ET.fromstring(div)
    assert root.tag == f"{XHTML}div"
    tags = {el.tag.removeprefix(XHTML) for el in root.iter()}
    assert tags <= NARRATIVE_ELEMENTS, tags - NARRATIVE_ELEMENTS
    attrs = {a for el in root.iter() for a in el.attrib}
    assert attrs <= {"style"}, attrs
    text = "".join(root.itertext())
    assert BANNER in text and "Diabetes mellitus type 2" in text and "87%" in text
    assert EVIL in text  # shown literally, never interpreted
    assert 'note mentions "diabetes"' in text


def test_narrative_of_an_abstention_and_control_characters() -> None:
    pred = Prediction("knowledge-rule-baseline", "1", "kg-abc", [], "nothing\x00\x1b here",
                      abstained=True, abstain_reason="no labs")
    root = ET.fromstring(narrative_div(pred))
    assert "No disorder supported." in "".join(root.itertext())
    html, _, _ = page(pred)
    assert "Abstained: no labs" in html and "\x00" not in html and "<svg" not in html


def test_codes_the_cap_left_out_are_named_in_page_and_narrative_not_concluded() -> None:
    pred = dataclasses.replace(prediction(), withheld=[
        Withheld("38341003", "Hypertensive disorder <b>", 0.97)])
    html, report, _ = page(pred)
    assert "Also above its threshold, not concluded" in html
    assert "Hypertensive disorder &lt;b&gt; (97%)" in html  # escaped like all server text
    text = "".join(ET.fromstring(report["text"]["div"]).itertext())
    assert "Hypertensive disorder <b> (97%)" in text
    codes = [c["coding"][0]["code"] for c in report["conclusionCode"]]
    assert "38341003" not in codes  # named, never a concluded code
    withheld = [e for e in report["extension"] if e["url"].endswith("/withheld")]
    assert [e["valueCodeableConcept"]["coding"][0]["code"] for e in withheld] == ["38341003"]
    assert "97%" in withheld[0]["valueCodeableConcept"]["text"]
    plain, _, _ = page()
    assert "not concluded" not in plain


def test_cited_values_carry_the_value_as_sent_and_the_identifier_is_unchanged() -> None:
    _, report, key = page()
    # rendering does not touch identity (the lifecycle's current key: patient and method)
    assert key == current_key("p1", prediction().method)
    _bare, bare_key = build_transaction("p1", prediction(), USED, [], ReportSettings(), now=NOW)
    assert bare_key == key
    cited = [e for e in report["extension"] if e["url"].endswith("/cited-value")]
    parts = [{p["url"]: p for p in e["extension"]} for e in cited]
    assert [p["source"]["valueString"] for p in parts] == [
        "Observation/a2/_history/2", "Observation/a1/_history/2", "Observation/g1/_history/1"]
    glucose = parts[2]
    assert glucose["value"]["valueQuantity"] == {"value": 8.2, "unit": "mmol/L"}  # as sent
    assert glucose["code"]["valueCoding"]["code"] == "2345-7"


def test_patient_header_comes_first_from_the_patient_resource_escaped() -> None:
    html, report, key = page(patient=PATIENT)
    body = html[html.index("<body>"):]
    header = body[:body.index("</header>")]
    assert body.index('class="patient"') < body.index('class="banner"')  # before anything else
    # official name (not the maiden one), family name first, markup in it shown as text
    assert "BOSCO&lt;B&gt;882&lt;/B&gt;, Celinda V." in header and "<b>882" not in html
    assert "Becker968" not in html
    assert "1961-04-12" in header and "female" in header and "Patient/p1" in header
    assert "MRN MRN-0042" in header and "999-78-4665" not in html  # the MRN, not the SSN
    assert "BOSCO&lt;B&gt;882&lt;/B&gt;" in html[html.index("<footer>"):]  # and on the footer
    root = ET.fromstring(report["text"]["div"])  # type: ignore[index]
    assert "Patient: BOSCO<B>882</B>, Celinda V.; born 1961-04-12; MRN MRN-0042" in \
        "".join(root.itertext())
    assert key == page()[2]  # the header does not change the report's identity


def test_patient_header_without_name_or_identifier_says_so() -> None:
    h = patient_header({"resourceType": "Patient", "id": "x"})
    assert (h.name, h.birth_date, h.identifier) == (NO_NAME, "not recorded", NO_IDENTIFIER)
    assert patient_header({"name": [{"text": " Jo Doe "}], "identifier": [{"value": "7"}]}) \
        .line() == "Jo Doe; born not recorded; ID 7"
    assert patient_header({"name": [{"given": ["Jo"]}]}).name == "Jo"
    html, _, _ = page()  # no Patient resource at all: the header is there, marked missing
    header = html[html.index('class="patient"'):html.index("</header>")]
    assert f'class="missing">{NO_NAME}' in header and NO_IDENTIFIER in header
    assert "Patient/p1" in header


def test_knowledge_facts_are_shown_by_their_labels() -> None:
    kg = load_graph()
    assoc = "https://w3id.org/clinragen/kg/fact/hba1c-diabetic-dm"
    finding = "https://w3id.org/clinragen/kg/finding/hba1c-diabetic"
    notes = "https://w3id.org/clinragen/kg/source/Notes"
    base = prediction()
    pred = Prediction(base.method, base.method_version, base.knowledge_version,
                      [Diagnosis("44054006", base.diagnoses[0].term, 0.87,
                                 base.diagnoses[0].evidence, (assoc,))], base.rationale,
                      facts_used=[assoc, f"{finding}|Observation/a2",
                                  f"{notes}|DocumentReference/d1#10-18"])
    labels = fact_labels(kg, pred, labs())
    assert labels[assoc] == "HbA1c in diabetic range supports " \
        f"{kg.label('http://snomed.info/id/73211009')} (ADA 2024)"
    assert labels[f"{finding}|Observation/a2"] == \
        "HbA1c in diabetic range: HbA1c 7.1 % on 2024-03-02"
    assert labels[f"{notes}|DocumentReference/d1#10-18"] == \
        "clinical note: DocumentReference/d1, characters 10-18"
    html, _, _ = page(pred, labels=labels)
    parser = _Tags()
    parser.feed(html)
    text = html.replace(f'title="{assoc}"', "")
    assert "HbA1c in diabetic range supports" in html and assoc not in text  # id only on hover
    assert f"<li title=\"{assoc}\">HbA1c in diabetic range supports" in html


def test_one_name_for_the_model_probability() -> None:
    html, report, _ = page()
    assert PROBABILITY == "model probability"
    assert f"<th>{PROBABILITY}</th>" in html and f"{PROBABILITY} 87%" in html
    assert "support 87%" not in html and "<th>probability</th>" not in html
    assert "support score" not in html
    div = report["text"]["div"]  # type: ignore[index]
    assert f"<th>{PROBABILITY}</th>" in div and "<th>probability</th>" not in div


def test_conclusions_say_they_were_not_compared_with_the_problem_list() -> None:
    # The prediction carries no "already a known Condition" flag: one list, and it says so.
    html, report, _ = page()
    assert "Suspected disorders" in html and PROBLEM_LIST_NOTE in html.replace("&#x27;", "'")
    assert PROBLEM_LIST_NOTE in "".join(ET.fromstring(report["text"]["div"]).itertext())  # type: ignore[index]


def test_trend_chart_has_dated_ticks_from_the_readings() -> None:
    html, _, _ = page()
    svg = html[html.index("<svg"):html.index("</svg>") + 6]
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    dates = [t.text for t in root.findall(f"{ns}text[@class='date']")]
    assert dates[0] == "2023-01-05" and dates[-1] == "2024-03-02"  # first and last HbA1c
    assert len(dates) == 4 and dates == sorted(dates)
    assert len(root.findall(f"{ns}line[@class='tick']")) == 4
    assert "3 readings from 2023-01-05 to 2024-03-02" in (root.find(f"{ns}title").text or "")
    assert "3 readings 2023-01-05 to 2024-03-02" in html  # the caption says it too
    texts = [t.text for t in root.findall(f"{ns}text")]
    assert "7.1" in texts  # the newest value is printed beside its point
