"""Renamed `clinragen_fhir.inference.generation` (issue 16: "decode" named four things).

Kept only for the importers not yet changed: inference/runtime.py and model/clinragen.py;
delete this module once they import `inference.generation`.
"""

from clinragen_fhir.inference.generation import (
    Constraint,
    DiagnosisConstraint,
    Generated,
    greedy,
    token_pieces,
)

__all__ = ["Constraint", "DiagnosisConstraint", "Generated", "greedy", "token_pieces"]
