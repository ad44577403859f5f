"""What the teacher is shown per stage, and how inputs are written as text.

Stages follow ClinRaGen's sequential distillation: a rationale from the notes alone, one from
the lab time series alone, a multimodal one with the retrieved knowledge, and the final
diagnosis. Labs are always written as "NAME VALUE UNIT on YYYY-MM-DD, DIRECTION" so that both
teachers' lab claims are in the form the faithfulness checker reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pandas as pd

from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.encoding.schema import Note, describe_reading
from clinragen_fhir.knowledge import KnowledgeGraph, Retrieval

STAGES = ("notes", "labs", "multimodal", "diagnosis")
MAX_LAB_LINES = 40
MAX_NOTE_CHARS = 4000
MAX_FACTS = 24

SYSTEM = (
    "You are a careful clinician teaching a student. You are given a patient's data up to a "
    "point in time and the diagnoses that were recorded afterwards. Write a short rationale "
    "(at most 120 words) that explains, from the data shown only, what supports or argues "
    "against each recorded diagnosis. Cite lab results exactly as written in the data "
    "(name, value, unit, date). Never invent values, dates or findings. When the data shown "
    "gives no evidence for a diagnosis, say so plainly (e.g. 'no lab evidence for X'). Do not "
    "propose other diagnoses.")

TEMPLATES = {
    "notes": "Clinical notes (oldest first; [masked] hides a disorder name):\n{notes}\n\n"
             "Recorded diagnoses: {diagnoses}\n\nRationale from the notes only:",
    "labs": "Lab and vital-sign results (oldest first):\n{labs}\n\n"
            "Recorded diagnoses: {diagnoses}\n\nRationale from the lab results only:",
    "multimodal": "Clinical notes:\n{notes}\n\nLab and vital-sign results:\n{labs}\n\n"
                  "Medical knowledge retrieved for this patient:\n{facts}\n\n"
                  "Known conditions before this time: {prior}\n\n"
                  "Recorded diagnoses: {diagnoses}\n\n"
                  "Rationale combining notes, labs and knowledge:",
    "diagnosis": "Rationale so far:\n{rationale}\n\nRecorded diagnoses: {diagnoses}\n\n"
                 "In one or two sentences, state the final diagnoses and the key evidence:",
}


def short_lab_name(kg: KnowledgeGraph, loinc: str, display: str = "") -> str:
    """The graph's name without a trailing qualifier ("Glucose (blood)" -> "Glucose")."""
    lab = kg.lab(loinc)
    name = lab.name if lab else (display or loinc)
    return re.sub(r"\s*\([^)]*\)\s*$", "", name) or name


def fmt_value(value: float) -> str:
    """3 significant digits, no exponent (the precision the faithfulness check compares at):
    `encoding.numbers.format_value`, the one form every path writes; "?" when not finite."""
    if not math.isfinite(value):
        return "?"
    return format_value(value)


def direction(value: float, low: float, high: float) -> str:
    """'high' / 'low' / 'normal' against the reference range, '' when there is none."""
    if not math.isnan(high) and value > high:
        return "high"
    if not math.isnan(low) and value < low:
        return "low"
    if math.isnan(low) and math.isnan(high):
        return ""
    return "normal"


def lab_phrase(kg: KnowledgeGraph, row: pd.Series) -> str:
    """One reading: "HbA1c 6.3 % on 2023-01-01, high (reference 4-5.7)"."""
    value = float(row["value"])
    low, high = float(row["ref_low"]), float(row["ref_high"])
    day = pd.Timestamp(row["time"]).strftime("%Y-%m-%d")
    # the lab frame holds finite values only (encoding.labs skips the others)
    text = describe_reading(short_lab_name(kg, str(row["loinc"]), str(row["display"])), value,
                            str(row["unit"]), day)
    d = direction(value, low, high)
    if d:
        if math.isnan(low):
            ref = f"<= {fmt_value(high)}"
        elif math.isnan(high):
            ref = f">= {fmt_value(low)}"
        else:
            ref = f"{fmt_value(low)}-{fmt_value(high)}"
        text += f", {d} (reference {ref})"
    return text


def render_labs(kg: KnowledgeGraph, labs: pd.DataFrame, max_lines: int = MAX_LAB_LINES) -> str:
    if labs.empty:
        return "(none)"
    rows = labs.sort_values("time", kind="stable").tail(max_lines)
    return "\n".join(f"- {lab_phrase(kg, r)}" for _, r in rows.iterrows())


def render_notes(notes: Sequence[Note], max_chars: int = MAX_NOTE_CHARS) -> str:
    """Newest notes first until the budget is spent, then shown oldest first."""
    kept: list[str] = []
    used = 0
    for n in sorted(notes, key=lambda n: (n.time is None, n.time), reverse=True):
        day = n.time.strftime("%Y-%m-%d") if n.time else "undated"
        text = " ".join(n.text.split())
        piece = f"[{day}] {text[: max(0, max_chars - used)]}"
        if used >= max_chars:
            break
        kept.append(piece)
        used += len(piece)
    return "\n".join(reversed(kept)) or "(none)"


def render_facts(retrieval: Retrieval, max_facts: int = MAX_FACTS) -> str:
    facts = retrieval.facts()[:max_facts]
    return "\n".join(f"- {s} {r} {o}" for s, r, o in facts) or "(none)"


def diagnoses_text(kg: KnowledgeGraph, labels: Sequence[str]) -> str:
    terms = []
    for code in labels:
        dis = kg.disorder(code)
        terms.append(f"{dis.term if dis else code} ({code})")
    return "; ".join(terms) or "none recorded in the window"


def stage_messages(stage: str, **fields: str) -> list[dict[str, str]]:
    """The chat messages for one stage; `fields` fill the template."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATES[stage].format(**fields)}]
