"""What a prediction is a function of, as one hash: the maker (method, versions, model), the
patient's sex and age, the lab frame and the notes. The current report carries it, so an
unchanged patient is not predicted again (and the report's own content fingerprint,
report/build.py, decides whether a new version is written)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clinragen_fhir.encoding.patient import PatientInputs
from clinragen_fhir.predict.types import (
    Identity,
    Prediction,
)
from clinragen_fhir.report.build import (
    EXT_BASE,
    model_of,
)

# on a written report: `inputs_fingerprint` of what it was predicted from (not written while the
# problem-list check is on: the Conditions then join the content and are read after predicting)
INPUTS_EXT = f"{EXT_BASE}/inputs-fingerprint"


def prediction_identity(prediction: Prediction) -> Identity:
    """The maker a prediction names, as `predict.types.declared_identity` gives it beforehand."""
    return (prediction.method, prediction.method_version, prediction.knowledge_version,
            model_of(prediction))


def inputs_fingerprint(inputs: PatientInputs, identity: Identity) -> str:
    """sha256 of what a prediction is a function of: the maker (method, versions, model), the
    patient's sex and age in days (age-specific reference ranges and exclusions), the lab frame
    (values, units, times, reference ranges, as encoded) and the notes (ids, versions, times,
    text). Equal on the current report: the same prediction again, so none is made."""
    p = inputs.patient
    age_days = ((p.index_time - p.birth_date).days
                if p.index_time is not None and p.birth_date is not None else None)
    h = hashlib.sha256(json.dumps([list(identity), p.sex, age_days, sorted(p.extra.items())],
                                  default=str).encode())
    h.update(inputs.labs.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S%z").encode())
    for n in inputs.notes:
        h.update(json.dumps([n.document_id, n.version_id, str(n.time), n.type_code,
                             hashlib.sha256(n.text.encode()).hexdigest()]).encode())
    return "sha256:" + h.hexdigest()


def stored_inputs_fingerprint(report: dict[str, Any]) -> str:
    """The inputs fingerprint a stored report carries ("" for reports without)."""
    return next((str(e.get("valueString", "")) for e in report.get("extension", []) or []
                 if e.get("url") == INPUTS_EXT), "")
