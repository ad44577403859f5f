"""Renamed `clinragen_fhir.inference.generation` (issue 16: "decode" named four things).

Kept only for importers not yet changed (inference/runtime.py, model/clinragen.py); delete this
module once they import `inference.generation`.
"""

from clinragen_fhir.inference.generation import (
    Constraint,
    DiagnosisConstraint,
    EmbedFn,
    Generated,
    StepFn,
    greedy,
    positions,
    token_pieces,
)

__all__ = ["Constraint", "DiagnosisConstraint", "EmbedFn", "Generated", "StepFn", "greedy",
           "positions", "token_pieces"]
