"""Small readers over parsed R4 resources: codes, references, times, versions.

fhir.resources 8 ships R4B, a technical correction of R4 whose Observation, DocumentReference,
Patient, DiagnosticReport and Provenance accept R4 JSON unchanged; we parse with it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
from pydantic import ValidationError

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


def first_error(exc: ValidationError) -> str:
    """One readable line from a pydantic error: the field path and the message."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}"[:200]


def to_utc(value: Any) -> pd.Timestamp | None:
    """A FHIR date/dateTime/instant (parsed or partial string) as a UTC timestamp; None when
    there is none or it lies outside what a timestamp holds (before 1677 or after 2262: the
    caller records "no usable date" rather than the worker failing on it)."""
    if value is None:
        return None
    try:
        if isinstance(value, datetime):
            ts = pd.Timestamp(value)
        elif isinstance(value, date):
            ts = pd.Timestamp(datetime(value.year, value.month, value.day))
        else:
            text = str(value)
            if len(text) == 4:
                text += "-01-01"
            elif len(text) == 7:
                text += "-01"
            ts = pd.Timestamp(text)
    except ValueError:  # pandas' OutOfBoundsDatetime is one
        return None
    if pd.isna(ts):
        return None
    ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)
    # pandas keeps a 1627 date at second resolution, but every frame column is nanoseconds
    if not _NS_MIN <= ts <= _NS_MAX:
        return None
    return ts


_NS_MIN = pd.Timestamp.min.tz_localize(UTC).ceil("D")  # 1677-09-22
_NS_MAX = pd.Timestamp.max.tz_localize(UTC).floor("D")  # 2262-04-11


def codes(concept: Any, system: str) -> list[str]:
    """Codes of a CodeableConcept in one system, in order."""
    if concept is None:
        return []
    return [c.code for c in (concept.coding or []) if c.system == system and c.code]


def category_codes(categories: Any) -> set[str]:
    return {c.code for cc in (categories or []) for c in (cc.coding or []) if c.code}


def version_of(resource: Any) -> str:
    meta = getattr(resource, "meta", None)
    return str(meta.versionId) if meta is not None and meta.versionId else ""
