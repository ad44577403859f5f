"""Small synthetic training examples with real LOINC/SNOMED codes (the real graph retrieves on
them), used by the training tests until and besides the dataset built from FHIR."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.encoding.schema import LAB_COLUMNS, Note, PatientContext
from training.example import Example

DM2, CKD, HTN = "44054006", "709044004", "38341003"
INDEX = datetime(2024, 6, 1, tzinfo=UTC)
# (loinc, display, unit, ref_low, ref_high)
LABS = {"4548-4": ("Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 5.7),
        "2345-7": ("Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70.0, 100.0),
        "33914-3": ("Glomerular filtration rate/1.73 sq M.predicted", "mL/min/{1.73_m2}", 90.0,
                    float("nan")),
        "8480-6": ("Systolic blood pressure", "mm[Hg]", 90.0, 120.0)}


def frame(rows: list[tuple[str, float, datetime]], prefix: str = "o") -> pd.DataFrame:
    records = []
    for i, (code, value, t) in enumerate(rows):
        display, unit, low, high = LABS[code]
        records.append({
            "observation_id": f"Observation/{prefix}{i}", "version_id": "1", "loinc": code,
            "display": display, "category": "laboratory", "value": value, "unit": unit,
            "raw_value": value, "raw_unit": unit, "time": pd.Timestamp(t),
            "ref_low": low, "ref_high": high, "interpretation": ""})
    return pd.DataFrame(records, columns=list(LAB_COLUMNS))


def _fmt(v: float) -> str:
    return format_value(v)  # as the prompt, the rationale and the report write it


def make_examples(n: int = 24, seed: int = 0) -> list[Example]:
    """Patients with diabetes (high HbA1c/glucose), CKD (low eGFR) or hypertension (high
    systolic), or none; split 60/20/20 by patient; rationales cite the real values and dates."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n):
        has = {DM2: p % 3 == 0, CKD: p % 4 == 1, HTN: p % 5 == 2}
        rows: list[tuple[str, float, datetime]] = []
        for k in range(3):
            t = INDEX - timedelta(days=300 - 100 * k)
            rows.append(("4548-4", round(float(rng.normal(7.6 if has[DM2] else 5.2, 0.3)), 1), t))
            rows.append(("2345-7", round(float(rng.normal(160 if has[DM2] else 88, 8)), 0), t))
            rows.append(("33914-3", round(float(rng.normal(45 if has[CKD] else 95, 5)), 0), t))
            rows.append(("8480-6", round(float(rng.normal(150 if has[HTN] else 115, 5)), 0), t))
        labs = frame(rows, prefix=f"p{p}o")
        complaint = ("reports thirst and frequent urination" if has[DM2] else
                     "reports ankle swelling" if has[CKD] else "reports headaches" if has[HTN]
                     else "has no complaints")
        notes = [Note(f"DocumentReference/p{p}n{k}", "1", INDEX - timedelta(days=200 - 90 * k),
                      f"The patient {complaint}. Follow up in clinic.") for k in range(2)]
        last = {code: (v, t) for code, v, t in rows}
        parts = []
        for code, flag, word in (("4548-4", has[DM2], "high"), ("33914-3", has[CKD], "low"),
                                 ("8480-6", has[HTN], "high")):
            v, t = last[code]
            parts.append(f"{LABS[code][0].split('/')[0]} "
                         f"{_fmt(v)} {LABS[code][1]} on {t.date().isoformat()}"
                         + (f" is {word}" if flag else " is normal"))
        labels = [c for c, v in has.items() if v]
        split = "train" if p % 5 < 3 else ("valid" if p % 5 == 3 else "test")
        out.append(Example(
            example_id=f"synthetic:p{p}:{INDEX.isoformat()}", source="synthetic",
            patient=PatientContext(f"p{p}", sex="female" if p % 2 else "male",
                                   birth_date=datetime(1960, 1, 1, tzinfo=UTC),
                                   index_time=INDEX),
            labs=labs, notes=notes, labels=labels, split=split,
            rationales={"notes": f"The notes say the patient {complaint}.",
                        "labs": "; ".join(parts) + ".",
                        "multimodal": f"The patient {complaint}; " + "; ".join(parts) + ".",
                        "diagnosis": "; ".join(parts) + "."}))
    return out
