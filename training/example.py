"""One training example: a patient at an index time, the inputs before it, the labels after it.

The dataset builder (`training.data`) writes these; distillation and evaluation read them. Kept
in one small module so both sides agree on the shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clinragen_fhir.encoding.schema import LAB_COLUMNS, Note, PatientContext


@dataclass
class Example:
    """Inputs dated strictly before `index_time`; labels recorded at or after it (in a window)."""

    example_id: str  # "<source>:<patient id>:<index time ISO>"
    source: str  # e.g. "synthea-exafluence-qicore", "clinosim-us-seed7", "fhir:<base hash>"
    patient: PatientContext
    labs: pd.DataFrame  # LAB_COLUMNS, time < index_time
    notes: list[Note]  # time < index_time, label mentions masked (see training.data)
    labels: list[str]  # SNOMED CT concept ids of the disorder vocabulary
    split: str = ""  # "train" | "valid" | "test", by patient
    rationales: dict[str, str] = field(default_factory=dict)  # stage -> teacher rationale
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. masked mention counts, teacher

    def to_json(self) -> dict[str, Any]:
        labs = self.labs.copy()
        labs["time"] = labs["time"].map(lambda t: t.isoformat())
        p = self.patient
        return {
            "example_id": self.example_id, "source": self.source, "split": self.split,
            "patient": {"patient_id": p.patient_id, "sex": p.sex,
                        "birth_date": p.birth_date.isoformat() if p.birth_date else None,
                        "index_time": p.index_time.isoformat() if p.index_time else None},
            "labs": labs.astype(object).where(labs.notna(), None).to_dict(orient="records"),
            "notes": [{**asdict(n), "time": n.time.isoformat() if n.time else None}
                      for n in self.notes],
            "labels": self.labels, "rationales": self.rationales, "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        p = d["patient"]
        patient = PatientContext(
            patient_id=p["patient_id"], sex=p.get("sex"),
            birth_date=datetime.fromisoformat(p["birth_date"]) if p.get("birth_date") else None,
            index_time=datetime.fromisoformat(p["index_time"]) if p.get("index_time") else None)
        labs = pd.DataFrame(d["labs"], columns=list(LAB_COLUMNS))
        labs["time"] = pd.to_datetime(labs["time"], utc=True, format="ISO8601")
        for col in ("value", "raw_value", "ref_low", "ref_high"):
            labs[col] = pd.to_numeric(labs[col], errors="coerce").astype(float)
        notes = [Note(document_id=n["document_id"], version_id=n["version_id"],
                      time=datetime.fromisoformat(n["time"]) if n.get("time") else None,
                      text=n["text"], type_code=n.get("type_code", "")) for n in d["notes"]]
        return cls(example_id=d["example_id"], source=d["source"], patient=patient, labs=labs,
                   notes=notes, labels=list(d["labels"]), split=d.get("split", ""),
                   rationales=dict(d.get("rationales", {})), meta=dict(d.get("meta", {})))


def write_examples(path: Path, examples: Iterable[Example]) -> int:
    """JSON Lines, one example per line; returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_examples(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield Example.from_json(json.loads(line))


def label_matrix(examples: Sequence[Example], disorders: Sequence[str], key: str = "labels",
                 dtype: type[np.generic] = np.int64) -> np.ndarray:
    """[n, D] 0/1 of the examples' labels, in `disorders`' order (`key="new_labels"`: the
    disorders first recorded at the example's visit, from its meta). int for metrics; the
    head's loss takes `dtype=np.float32`. Codes outside `disorders` are left out."""
    index = {d: j for j, d in enumerate(disorders)}
    y = np.zeros((len(examples), len(disorders)), dtype=dtype)
    for i, ex in enumerate(examples):
        codes = ex.labels if key == "labels" else ex.meta.get(key, [])
        for code in codes:
            if code in index:
                y[i, index[code]] = 1
    return y
