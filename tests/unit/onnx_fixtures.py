"""Torch-free inputs for the ONNX tests: synthetic patients with real LOINC codes, the real
knowledge graph, and the tiny model's word list (the subprocess of test_torch_free imports this
with torch blocked)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

import pandas as pd

from clinragen_fhir.encoding.schema import LAB_COLUMNS, Note, PatientContext
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph

INDEX = datetime(2024, 3, 3, tzinfo=UTC)
CODES = ["44054006", "38341003", "414916001"]
TERMS = ["Diabetes mellitus type 2", "Hypertensive disorder", "Obesity"]
LOINC = ["4548-4", "2345-7", "8480-6"]
WORDS = ["HbA1c", "Glucose", "Systolic", "blood", "pressure", "is", "high", "supports", "observed",
         "as", "the", "patient", "reports", "thirst", "and", "tired", "no", "none", "fever",
         "Diabetes", "mellitus", "type", "2", "Hypertensive", "disorder", "Obesity", "%",
         "mg/dL", "on", "Lab", "results:", "Medical", "knowledge:", "Clinical", "notes:",
         "Diagnosis:", ";", *CODES, *(f"{c};" for c in CODES)]


@cache
def graph() -> KnowledgeGraph:
    return load_graph()


def lab_frame(i: int) -> pd.DataFrame:
    """Patient i: a few HbA1c/glucose readings, some high, of varying number."""
    rows = []
    for k in range(1 + i % 5):
        code, unit, low, high = (("4548-4", "%", 4.0, 5.6) if k % 2 == 0
                                 else ("2345-7", "mg/dL", 70.0, 99.0))
        value = (5.0 + 0.6 * (i % 7) + 0.3 * k) if code == "4548-4" else 90.0 + 15 * (i % 4)
        rows.append({"observation_id": f"Observation/p{i}o{k}", "version_id": "1", "loinc": code,
                     "display": code, "category": "laboratory", "value": value, "unit": unit,
                     "raw_value": value, "raw_unit": unit,
                     "time": pd.Timestamp(f"2024-02-{k + 1:02d}", tz="UTC"), "ref_low": low,
                     "ref_high": high, "interpretation": ""})
    return pd.DataFrame(rows, columns=list(LAB_COLUMNS))


def notes(i: int) -> list[Note]:
    text = ["the patient reports thirst", "tired no fever", "", "blood pressure is high"][i % 4]
    return [Note(f"DocumentReference/n{i}", "1", datetime(2024, 3, 1, tzinfo=UTC), text)] \
        if text else []


def patient(i: int) -> PatientContext:
    return PatientContext(f"p{i}", sex="female", index_time=INDEX)


def patients(n: int = 32) -> list[tuple[pd.DataFrame, list[Note], PatientContext]]:
    return [(lab_frame(i), notes(i), patient(i)) for i in range(n)]


