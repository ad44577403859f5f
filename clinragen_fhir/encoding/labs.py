"""Observations -> the lab frame: one row per numeric reading, in the graph's canonical unit.

Every Observation not used is recorded as a Skip with a reason; none is dropped silently.
Blood pressure panels are expanded into their systolic/diastolic components. The newest
MAX_READINGS readings are kept; `observations` may be a stream (a search generator), pruned as
it comes, so a patient's whole history is never held at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pandas as pd
from fhir.resources.R4B.observation import Observation

from clinragen_fhir.encoding.schema import LAB_COLUMNS, PatientContext, Skip
from clinragen_fhir.encoding.validated import validated
from clinragen_fhir.fhir.resources import (
    LOINC,
    category_codes,
    codes,
    to_utc,
    version_of,
)

USABLE_STATUS = {"final", "amended", "corrected", "preliminary"}
USABLE_CATEGORY = ("laboratory", "vital-signs")
MAX_READINGS = 20_000  # newest kept beyond this: bounded memory for absurd series


class _CanonicalUnit(Protocol):
    @property
    def canonical_unit(self) -> str: ...


class LabKnowledge(Protocol):
    """What the lab encoder asks of the knowledge graph (`knowledge.KnowledgeGraph` is one).

    Declared here so that encoding does not import knowledge: knowledge reads encoded inputs
    (`encoding.schema`), not the other way round. A code or unit the graph cannot convert
    raises a ValueError (`knowledge.KnowledgeError` is one), which makes the reading a skip.
    """

    def to_canonical(self, loinc: str, value: float, unit: str) -> float: ...

    def lab(self, loinc: str) -> _CanonicalUnit | None: ...

    def reference_range(self, loinc: str, sex: str | None,
                        age_years: float | None) -> tuple[float | None, float | None]: ...


def _quantity(q: Any) -> tuple[float, str] | str:
    """(value, unit) of a Quantity, or the reason it is unusable."""
    if q is None or q.value is None:
        return "no value"
    value = float(q.value)
    if not math.isfinite(value):
        return "value is not a finite number"
    unit = q.code or q.unit or ""
    return value, unit


def _reference_range(obs: Observation) -> tuple[float | None, float | None, str]:
    for rr in obs.referenceRange or []:
        low = float(rr.low.value) if rr.low is not None and rr.low.value is not None else None
        high = float(rr.high.value) if rr.high is not None and rr.high.value is not None else None
        bound = rr.low or rr.high
        unit = (bound.code or bound.unit or "") if bound is not None else ""
        if low is not None or high is not None:
            return low, high, unit
    return None, None, ""


def _interpretation(obs: Observation) -> str:
    for concept in obs.interpretation or []:
        for coding in concept.coding or []:
            if coding.code:
                return str(coding.code)
    return ""


def _newest_rows(rows: list[dict[str, Any]], skips: list[Skip]) -> list[dict[str, Any]]:
    """The newest MAX_READINGS rows, in the order they came; a Skip for each Observation that
    has no reading left (the same rule as the frame's final cut)."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["time"], rows[i]["loinc"]))
    keep = order[-MAX_READINGS:]
    kept = {rows[i]["observation_id"] for i in keep}
    skips += [Skip(ref, f"older than the newest {MAX_READINGS} readings")
              for ref in dict.fromkeys(rows[i]["observation_id"] for i in order[:-MAX_READINGS])
              if ref not in kept]
    return [rows[i] for i in sorted(keep)]


def build_lab_frame(
    observations: Iterable[dict[str, Any]],
    kg: LabKnowledge,
    patient: PatientContext | None = None,
    now: datetime | None = None,
) -> tuple[pd.DataFrame, list[Skip]]:
    """Parse, validate, convert units, attach reference ranges; return rows and skips."""
    now = now or datetime.now(UTC)
    future_limit = pd.Timestamp(now + timedelta(days=1))
    sex = patient.sex if patient else None
    age = patient.age_years() if patient else None
    rows: list[dict[str, Any]] = []
    skips: list[Skip] = []
    for ref, obs in validated(observations, Observation, "Observation", skips):
        if obs.status not in USABLE_STATUS:
            skips.append(Skip(ref, f"status {obs.status}"))
            continue
        cats = category_codes(obs.category)
        category = next((c for c in USABLE_CATEGORY if c in cats), None)
        if category is None:
            skips.append(Skip(ref, "not a laboratory or vital-signs Observation"))
            continue
        time = to_utc(obs.effectiveDateTime or obs.effectiveInstant
                      or (obs.effectivePeriod.start if obs.effectivePeriod else None)
                      or obs.issued)
        if time is None:
            skips.append(Skip(ref, "no usable date"))
            continue
        if time > future_limit:
            skips.append(Skip(ref, "dated in the future"))
            continue
        # One Observation gives one reading, or one per component (blood pressure).
        parts: list[tuple[Any, Any, str]] = []
        if obs.component:
            parts = [(c.code, c.valueQuantity, c.code.text or "") for c in obs.component]
        elif obs.valueQuantity is not None:
            parts = [(obs.code, obs.valueQuantity, obs.code.text or "")]
        else:
            kind = next((k for k in ("valueString", "valueCodeableConcept", "valueBoolean")
                         if getattr(obs, k, None) is not None), None)
            skips.append(Skip(ref, f"non-numeric value ({kind})" if kind else "no value"))
            continue
        low, high, rr_unit = _reference_range(obs)
        interpretation = _interpretation(obs)
        used = 0
        reasons: list[str] = []
        for concept, quantity, text in parts:
            loincs = codes(concept, LOINC)
            if not loincs:
                reasons.append("no LOINC code")
                continue
            loinc = loincs[0]
            q = _quantity(quantity)
            if isinstance(q, str):
                reasons.append(f"{loinc}: {q}")
                continue
            raw_value, raw_unit = q
            try:
                value = kg.to_canonical(loinc, raw_value, raw_unit)
                lab = kg.lab(loinc)
                unit = lab.canonical_unit if lab else raw_unit
                ref_low = kg.to_canonical(loinc, low, rr_unit or raw_unit) if low is not None \
                    else None
                ref_high = kg.to_canonical(loinc, high, rr_unit or raw_unit) if high is not None \
                    else None
            except ValueError as exc:  # knowledge.KnowledgeError: unknown code or unit
                reasons.append(f"{loinc}: {exc}")
                continue
            if ref_low is None and ref_high is None:
                ref_low, ref_high = kg.reference_range(loinc, sex, age)
            rows.append({
                "observation_id": ref, "version_id": version_of(obs), "loinc": loinc,
                "display": text or (concept.coding[0].display if concept.coding else "") or "",
                "category": category, "value": value, "unit": unit,
                "raw_value": raw_value, "raw_unit": raw_unit, "time": time,
                "ref_low": math.nan if ref_low is None else ref_low,
                "ref_high": math.nan if ref_high is None else ref_high,
                "interpretation": interpretation,
            })
            used += 1
        if not used:
            skips.append(Skip(ref, "; ".join(reasons) or "no usable reading"))
        elif len(rows) > 2 * MAX_READINGS:  # pruned as they come: bounded however many arrive
            rows = _newest_rows(rows, skips)
    frame = pd.DataFrame(rows, columns=list(LAB_COLUMNS))
    if not frame.empty:
        frame = frame.sort_values(["time", "loinc"], kind="stable")
        if len(frame) > MAX_READINGS:  # the older readings go, each with its reason
            kept = set(frame["observation_id"].iloc[-MAX_READINGS:])
            skips += [Skip(ref, f"older than the newest {MAX_READINGS} readings")
                      for ref in dict.fromkeys(frame["observation_id"].iloc[:-MAX_READINGS])
                      if ref not in kept]
            frame = frame.tail(MAX_READINGS)
        frame = frame.reset_index(drop=True)
    return frame, skips
