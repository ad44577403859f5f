"""Renamed `clinragen_fhir.predict.diagnosis_line` (issue 16: "decode" named four things).

Kept only for the two importers not yet changed: inference/runtime.py (DIAGNOSIS_LABEL) and
inference/predictor.py (split_output); delete this module once they import
`predict.diagnosis_line`.
"""

from clinragen_fhir.predict.diagnosis_line import DIAGNOSIS_LABEL, split_output

__all__ = ["DIAGNOSIS_LABEL", "split_output"]
