"""Human-readable renderings of a Prediction: a standalone HTML page and a FHIR narrative.

Clinicians read `DiagnosticReport.presentedForm` (text/html) and `text.div`, not JSON. Both are
built here from the same data, every string escaped. The HTML page is self-contained (inline CSS
and a hand-written SVG trend chart per lab, no script, no external resource, a CSP that forbids
loading any), so it can be opened from a mail or an EHR viewer safely. The narrative keeps to the
FHIR xhtml subset (no SVG, no script, no style sheets; `style` attributes only).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from clinragen_fhir import __version__
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction

BANNER = "Preliminary \u2014 decision support, not a diagnosis"
BANNER_DETAIL = ("Machine-generated from the cited values by ClinRaGen-FHIR. A clinician must "
                 "review the cited values before acting.")
MAX_POINTS = 60  # per trend chart: the newest readings
MAX_NARRATIVE_ROWS = 40  # cited values listed in the narrative (the HTML lists all)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value: object) -> str:
    """Escaped text, valid in both HTML and XML (control characters dropped)."""
    return html.escape(_CONTROL.sub("", str(value)), quote=True)


def fmt(value: float | None) -> str:
    """A value as a clinician writes it: no float noise, at most 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}"


@dataclass(frozen=True)
class Point:
    time: str  # ISO 8601
    value: float
    reference: str  # "Observation/<id>"


@dataclass(frozen=True)
class Trend:
    """One lab's readings (canonical unit) and its reference range, for a chart."""

    loinc: str
    display: str
    unit: str
    points: tuple[Point, ...]
    ref_low: float | None = None
    ref_high: float | None = None


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def lab_trends(labs: pd.DataFrame | None, loincs: Iterable[str]) -> dict[str, Trend]:
    """The readings of each named LOINC code in the lab frame, oldest first (newest MAX_POINTS)."""
    wanted = [c for c in dict.fromkeys(loincs) if c]
    if labs is None or labs.empty or not wanted:
        return {}
    out: dict[str, Trend] = {}
    for loinc in wanted:
        rows = labs[labs["loinc"] == loinc].sort_values("time").tail(MAX_POINTS)
        if rows.empty:
            continue
        points = tuple(Point(pd.Timestamp(t).isoformat(), float(v), str(ref))
                       for t, v, ref in zip(rows["time"], rows["value"], rows["observation_id"],
                                            strict=True))
        last = rows.iloc[-1]
        out[loinc] = Trend(loinc, str(last["display"] or loinc), str(last["unit"]), points,
                           _num(last["ref_low"]), _num(last["ref_high"]))
    return out


def trend_svg(trend: Trend, cited: Iterable[str] = (), width: int = 320,
              height: int = 110) -> str:
    """An inline SVG line chart: readings, the reference range band, cited readings in red."""
    cited_refs = set(cited)
    pad_l, pad_r, pad_t, pad_b = 44, 8, 8, 20
    pts = trend.points
    times = [pd.Timestamp(p.time).timestamp() for p in pts]
    values = [p.value for p in pts]
    bounds = values + [b for b in (trend.ref_low, trend.ref_high) if b is not None]
    lo, hi = min(bounds), max(bounds)
    if hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    margin = (hi - lo) * 0.08
    lo, hi = lo - margin, hi + margin
    t0, t1 = min(times), max(times)
    span = (t1 - t0) or 1.0
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: float) -> float:
        return pad_l + (plot_w * (t - t0) / span if t1 > t0 else plot_w / 2)

    def y(v: float) -> float:
        return pad_t + plot_h * (1 - (v - lo) / (hi - lo))

    title = f"{trend.display} ({trend.unit}), {len(pts)} readings"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="trend" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" '
             'fill="#fafafa" stroke="#bbb"/>']
    if trend.ref_low is not None or trend.ref_high is not None:
        top = y(trend.ref_high) if trend.ref_high is not None else pad_t
        bottom = y(trend.ref_low) if trend.ref_low is not None else pad_t + plot_h
        top, bottom = max(pad_t, min(top, bottom)), min(pad_t + plot_h, max(top, bottom))
        parts.append(f'<rect x="{pad_l}" y="{top:.1f}" width="{plot_w}" '
                     f'height="{max(0.0, bottom - top):.1f}" fill="#e3f2e1">'
                     f'<title>reference range {esc(fmt(trend.ref_low))}\u2013'
                     f'{esc(fmt(trend.ref_high))} {esc(trend.unit)}</title></rect>')
    if len(pts) > 1:
        line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, values, strict=True))
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f5f9f" '
                     'stroke-width="1.5"/>')
    for p, t, v in zip(pts, times, values, strict=True):
        hit = p.reference in cited_refs
        parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="{3.2 if hit else 2.2}" '
                     f'fill="{"#c62828" if hit else "#1f5f9f"}"><title>{esc(p.time[:10])}: '
                     f'{esc(fmt(v))} {esc(trend.unit)}</title></circle>')
    parts += [
        f'<text x="{pad_l - 4}" y="{pad_t + 9}" text-anchor="end" font-size="10">'
        f'{esc(fmt(hi - margin))}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end" font-size="10">'
        f'{esc(fmt(lo + margin))}</text>',
        f'<text x="{pad_l}" y="{height - 5}" font-size="10">{esc(pts[0].time[:10])}</text>',
        f'<text x="{width - pad_r}" y="{height - 5}" text-anchor="end" font-size="10">'
        f'{esc(pts[-1].time[:10])}</text>',
        "</svg>"]
    return "".join(parts)


def _evidence_rows(evidence: Sequence[Evidence]) -> str:
    rows = []
    for e in evidence:
        ref = f"{e.reference}/_history/{e.version_id}" if e.version_id else e.reference
        rows.append(f"<tr><td>{esc(e.time[:10])}</td><td>{esc(e.display or e.loinc)}</td>"
                    f'<td class="num">{esc(fmt(e.value))}</td><td>{esc(e.unit)}</td>'
                    f"<td>{esc(e.statement)}</td><td><code>{esc(ref)}</code></td></tr>")
    return "".join(rows)


def _diagnosis_section(d: Diagnosis, trends: Mapping[str, Trend]) -> str:
    cited = {e.reference for e in d.evidence}
    charts = "".join(
        f'<figure>{trend_svg(trends[c], cited)}<figcaption>{esc(trends[c].display)} '
        f"({esc(trends[c].unit)}); red: cited readings; green band: reference range"
        "</figcaption></figure>"
        for c in dict.fromkeys(e.loinc for e in d.evidence) if c in trends)
    table = ("<table><thead><tr><th>date</th><th>lab</th><th>value</th><th>unit</th>"
             "<th>why it counts</th><th>source (version)</th></tr></thead>"
             f"<tbody>{_evidence_rows(d.evidence)}</tbody></table>") if d.evidence else \
        "<p>No cited values.</p>"
    facts = "".join(f"<li><code>{esc(k)}</code></li>" for k in d.knowledge)
    return (f'<section class="dx"><h2>{esc(d.term)} <small>SNOMED CT {esc(d.snomed)}; '
            f"support {d.probability:.0%}</small></h2>"
            f"<h3>Cited values</h3>{table}"
            + (f'<h3>Trends</h3><div class="charts">{charts}</div>' if charts else "")
            + (f"<h3>Knowledge used</h3><ul>{facts}</ul>" if facts else "")
            + "</section>")


CSS = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:60em;color:#222}"
       ".banner{background:#fff3cd;border:2px solid #e0a800;padding:.6em 1em;font-weight:bold}"
       ".banner span{display:block;font-weight:normal;font-size:.9em}"
       "table{border-collapse:collapse;margin:.5em 0;font-size:.9em}"
       "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
       "td.num{text-align:right}small{font-weight:normal;color:#555}"
       ".charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}"
       "figcaption{font-size:.8em;color:#555;max-width:320px}"
       "footer{margin-top:2em;font-size:.85em;color:#555}")


def render_html(prediction: Prediction, trends: Mapping[str, Trend], *, issued: datetime,
                report_key: str = "", claims: str = "") -> str:
    """The whole report as one self-contained HTML page."""
    if prediction.diagnoses:
        summary = "".join(
            f"<tr><td>{esc(d.term)}</td><td>{esc(d.snomed)}</td>"
            f'<td class="num">{d.probability:.0%}</td><td class="num">{len(d.evidence)}</td></tr>'
            for d in prediction.diagnoses)
        conclusion = ("<table><thead><tr><th>diagnosis</th><th>SNOMED CT</th>"
                      "<th>probability</th><th>cited values</th></tr></thead>"
                      f"<tbody>{summary}</tbody></table>")
        if prediction.method == "knowledge-rule-baseline":  # no calibrated model behind it
            conclusion += ("<p><small>For the knowledge-rule baseline, probability is the "
                           "knowledge graph's support score, not a calibrated probability."
                           "</small></p>")
    else:
        conclusion = "<p><b>No disorder supported.</b></p>"
    if prediction.abstained:
        conclusion += f"<p>Abstained: {esc(prediction.abstain_reason)}</p>"
    sections = "".join(_diagnosis_section(d, trends) for d in prediction.diagnoses)
    facts = "".join(f"<li><code>{esc(k)}</code></li>" for k in prediction.facts_used)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ClinRaGen report (preliminary)</title><style>{CSS}</style></head><body>"
        f'<div class="banner" role="alert">{esc(BANNER)}<span>{esc(BANNER_DETAIL)}</span></div>'
        f"<h1>Diagnostic decision support</h1>{conclusion}"
        f"<h2>Rationale</h2><p>{_lines(prediction.rationale)}</p>"
        + (f"<p><small>Checked: {esc(claims)}</small></p>" if claims else "") + f"{sections}"
        + (f"<h2>All knowledge facts used</h2><ul>{facts}</ul>" if facts else "")
        + f"<footer><p>Method {esc(prediction.method)} version {esc(prediction.method_version)}; "
        f"knowledge {esc(prediction.knowledge_version)}; ClinRaGen-FHIR {esc(__version__)}.</p>"
        f"<p>Issued {esc(issued.isoformat())}"
        + (f"; report identifier <code>{esc(report_key)}</code>" if report_key else "")
        + "</p></footer></body></html>")


def narrative_div(prediction: Prediction, claims: str = "") -> str:
    """`DiagnosticReport.text.div`: the same content within the FHIR narrative xhtml subset."""
    if prediction.diagnoses:
        rows = "".join(f"<tr><td>{esc(d.term)}</td><td>{esc(d.snomed)}</td>"
                       f"<td>{d.probability:.0%}</td></tr>" for d in prediction.diagnoses)
        conclusion = ("<table><tr><th>diagnosis</th><th>SNOMED CT</th><th>probability</th></tr>"
                      f"{rows}</table>")
    else:
        conclusion = "<p>No disorder supported.</p>"
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
