"""The one shape a patient's inputs take between FHIR parsing and prediction.

Every predictor (rules, the SLM) and the knowledge retrieval read these, so they are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from clinragen_fhir.encoding.numbers import format_value

# Columns of the lab frame (pandas.DataFrame), one row per usable numeric reading.
LAB_COLUMNS: tuple[str, ...] = (
    "observation_id",  # "Observation/<id>"
    "version_id",  # meta.versionId as a string ("" when the server gave none)
    "loinc",  # LOINC code, e.g. "4548-4"
    "display",  # the code's display text from the resource
    "category",  # "laboratory" or "vital-signs"
    "value",  # float, in the canonical UCUM unit of the LOINC code
    "unit",  # canonical UCUM unit string ("%", "mg/dL", ...)
    "raw_value",  # float as sent
    "raw_unit",  # unit as sent (UCUM code, else unit text)
    "time",  # pandas Timestamp, tz-aware UTC (effective[x], else issued)
    "ref_low",  # float | NaN: reference range low (resource's own, else the graph's)
    "ref_high",  # float | NaN
    "interpretation",  # "H" / "L" / "N" / "" from Observation.interpretation
)


@dataclass(frozen=True)
class Reading:
    """One lab reading as a resource reference: the row behind a lab token (so attention can be
    traced back), and the reading that made a finding fire (`knowledge.retrieval`)."""

    observation_id: str
    version_id: str
    loinc: str
    display: str
    value: float
    unit: str
    time: str  # ISO 8601 (UTC)

    @property
    def name(self) -> str:
        return self.display or self.loinc

    def describe(self, flag: str = "", was: bool = False) -> str:
        """`describe_reading` of this reading, named by its display (else its LOINC code)."""
        return describe_reading(self.name, self.value, self.unit, self.time, flag, was=was)


def describe_reading(name: str, value: float | None, unit: str, when: str | date | datetime,
                     flag: str = "", *, was: bool = False) -> str:
    """A reading as text, the one form every path writes it in (reports, prompts, the teacher,
    the rationale checker): "<name> <value> <unit> on <YYYY-MM-DD>[, <flag>]", or with `was`
    "<name> was <value> ..." (the rule baseline's and the template rationales' sentences).

    The value is `encoding.numbers.format_value`'s. The released model was trained on this text
    (`encoding.features.reading_texts`: "HbA1c 7.2 % on 2024-03-01, high") and
    `report.faithfulness` parses it back: it must not change (tests/unit/test_numbers.py).
    """
    day = when.date() if isinstance(when, datetime) else when
    text = day.isoformat() if isinstance(day, date) else str(day)[:10]
    verb = " was " if was else " "
    return f"{name}{verb}{format_value(value)} {unit} on {text}" + (f", {flag}" if flag else "")


@dataclass(frozen=True)
class Note:
    """One decoded clinical note (DocumentReference)."""

    document_id: str  # "DocumentReference/<id>"
    version_id: str
    time: datetime | None
    text: str
    type_code: str = ""  # LOINC document type, e.g. 34117-2


@dataclass(frozen=True)
class Skip:
    """An input resource we did not use, and why (recorded in Provenance and logs)."""

    reference: str  # "Observation/<id>"
    reason: str


@dataclass
class PatientContext:
    """Demographics the knowledge needs for sex/age-specific reference ranges."""

    patient_id: str
    sex: str | None = None  # FHIR administrative gender: "male" / "female" / "other" / "unknown"
    birth_date: datetime | None = None
    index_time: datetime | None = None  # "now" for the worker; the cut-off in training
    extra: dict[str, str] = field(default_factory=dict)

    def age_years(self) -> float | None:
        if self.birth_date is None or self.index_time is None:
            return None
        return (self.index_time - self.birth_date).days / 365.25
