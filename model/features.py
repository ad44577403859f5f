"""Moved to `clinragen_fhir.encoding.features` (the torch-free runtime featurises exactly as
training does). Kept only for the importer not yet changed, training/distill.py; delete it once
that imports `clinragen_fhir.encoding.features`."""

from clinragen_fhir.encoding.features import Features, Modalities

__all__ = ["Features", "Modalities"]
