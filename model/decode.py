"""Moved to `clinragen_fhir.predict.decode` (the torch-free runtime parses the diagnosis line);
this re-export keeps `model.decode` imports working."""

from clinragen_fhir.predict.decode import (
    DIAGNOSIS_LABEL,
    abstain,
    format_target,
    split_output,
    uncertain_band,
    verhoeff_ok,
)

__all__ = ["DIAGNOSIS_LABEL", "abstain", "format_target", "split_output", "uncertain_band",
           "verhoeff_ok"]
