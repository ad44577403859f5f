"""ClinRaGen-FHIR: a small, auditable diagnosis assistant that explains itself, as a FHIR worker."""

__version__ = "0.1.0"
