"""Moved to `clinragen_fhir.encoding.features` (the torch-free runtime featurises exactly as
training does). Kept only for the importers not yet changed: training/distill.py and
tests/unit/test_model.py; delete it once they import `clinragen_fhir.encoding.features`."""

from clinragen_fhir.encoding.features import Budgets, Features, Modalities, featurise

__all__ = ["Budgets", "Features", "Modalities", "featurise"]
