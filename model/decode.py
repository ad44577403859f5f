"""Moved to `clinragen_fhir.predict.diagnosis_line` (the torch-free runtime parses the diagnosis
line). Kept only for the importers not yet changed: model/clinragen.py, training/distill.py,
training/evaluate.py; delete it once they import `clinragen_fhir.predict.diagnosis_line`."""

from clinragen_fhir.predict.diagnosis_line import format_target, split_output

__all__ = ["format_target", "split_output"]
