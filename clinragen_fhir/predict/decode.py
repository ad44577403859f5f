"""Renamed `clinragen_fhir.predict.diagnosis_line` (issue 16: "decode" named four things).

Kept only for importers not yet changed (inference/runtime.py, inference/predictor.py); delete
this module once they import `predict.diagnosis_line`.
"""

from clinragen_fhir.predict.diagnosis_line import (
    DIAGNOSIS_LABEL,
    abstain,
    format_target,
    split_output,
    uncertain_band,
    verhoeff_ok,
)

__all__ = ["DIAGNOSIS_LABEL", "abstain", "format_target", "split_output", "uncertain_band",
           "verhoeff_ok"]
